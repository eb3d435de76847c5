"""Files written whole under a name someone asked for (backups): private from the first byte, never
seen half-written, and never written over unless asked.

The part file is its writer's own (two backups of one path at once each write theirs, and neither
truncates or removes the other's), and the finished file takes its name in one step that fails
when the name is taken (a hard link): a check before the rename would leave the gap in which
another writer's file is silently replaced. A part file names its writer's pid, so the part files
of a backup that was killed (and their SQLite journals) are removed by the next backup into that
folder, never those of a backup still running."""
from __future__ import annotations

import errno
import os
import re
import shlex
import stat
import tempfile
import time
from pathlib import Path

import psutil

from db.run_records import read_record

#: ``.<name, cut>.<pid>.<random>.part``, and the SQLite journals of one (``-journal``, ``-wal``, ``-shm``).
PART_RE = re.compile(r"\..*\.(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.part(?:-journal|-wal|-shm)?")
#: How much of the destination's name a part file repeats: enough to tell whose it is, short enough
#: that the part file and its journal fit the 255 bytes of a name whatever the destination's.
NAME_KEPT = 64


def part_file(dest: Path) -> Path:
    """A new empty file, mode 0600, in ``dest``'s folder (made if missing, 0700), named
    ``.<dest's name>.<pid>.<random>.part``: the caller writes into it, then :func:`put_in_place`.
    The part files there of processes no longer running are removed first."""
    try:  # private whatever the umask: `workers.jobs --run backup` from a login shell made backups/ 0755
        make_folder(dest.parent)
    except (FileExistsError, NotADirectoryError):  # mkdir's own words name the file, not the problem
        if dest.parent.is_symlink() and not dest.parent.exists():  # a mount gone, a link mistyped
            raise NotADirectoryError(f"{dest.parent} is a link to {os.readlink(dest.parent)}, which is not "
                                     "there") from None
        raise NotADirectoryError(f"{dest.parent} is not a folder (a file is in the way)") from None
    remove_orphans(dest.parent)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name[:NAME_KEPT]}.{os.getpid()}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    return Path(name)


def touch_private(path: Path) -> None:
    """``path`` made if missing, mode 0600 either way (its content untouched): for a file another
    program opens later under its own umask (circusd's log), which then stays private."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def database_files(path: Path) -> dict[str, Path]:
    """An SQLite database file and the two SQLite keeps beside it in WAL mode."""
    return {"db": path, "wal": Path(f"{path}-wal"), "shm": Path(f"{path}-shm")}


#: The first 16 bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"


def not_sqlite_words(path: Path | None) -> str | None:
    """Why ``path`` is not an SQLite database, when it is a file that begins otherwise (a wrong
    ``DATABASE_URL``: a CSV file, a PostgreSQL dump; or a database whose first page was destroyed);
    None when it begins as one does, is empty (SQLite makes it one), is no regular file (SQLite's
    own error says so), or cannot be read. SQLite says only "file is not a database", which doctor
    took for damage, with a restore to mend it. None for no path (a server's database)."""
    if path is None:
        return None
    try:  # without O_NONBLOCK, the open of a FIFO waits for a writer: the writer's start hung on one
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.read(fd, len(SQLITE_HEADER))
    except OSError:
        return None
    finally:
        os.close(fd)
    if not head or head == SQLITE_HEADER:
        return None
    # Both as bytes, the NUL too: "begins with b'SQLite format 3X', where every SQLite database begins
    # with 'SQLite format 3'" (or a file cut short at 15 bytes) read as a contradiction.
    whole = f" (the whole file: {len(head)} bytes)" if len(head) < len(SQLITE_HEADER) else ""
    return (f"{path} is not an SQLite database: it begins with {head!r}{whole}, where every SQLite database "
            f"begins with the {len(SQLITE_HEADER)} bytes {SQLITE_HEADER!r}")


def not_sqlite_reason(path: Path | None) -> str | None:
    """:func:`not_sqlite_words` as the reason a command failed, asking what most likely happened."""
    words = not_sqlite_words(path)
    return None if words is None else f"{words}; does DATABASE_URL name the wrong file?"


def restore_marker(path: Path) -> Path:
    """The file ``db restore`` keeps beside the SQLite database ``path`` while it swaps the files:
    from the first move aside to the restored copy's taking the name, ``path`` is missing, and a
    writer started then would make a new, empty database there (:func:`unfinished_restore`)."""
    return path.with_name(f"{path.name}.restoring")


#: What ``db restore`` keeps of the database it replaces (:func:`db.backups.replaced_copy` names them):
#: SQLite's file (with its ``-wal`` and ``-shm``, ``.2`` and on for a second restore within a second)
#: beside it, PostgreSQL's dump in the home.
REPLACED_RE = re.compile(r"(?:(?P<name>.+)\.replaced-(?P<stamp>\d{8}T\d{6}Z)(?:\.(?P<n>\d+))?(?:-wal|-shm)?"
                         r"|tickstack\.replaced-(?P<dstamp>\d{8}T\d{6}Z)(?:\.(?P<dn>\d+))?\.dump)")


def _marked_names(path: Path) -> tuple[str, str] | None:
    """The names of the backup's copy and of the replaced database that ``path``'s
    :func:`restore_marker` gives, when they are names ``db restore`` gives them beside ``path`` (a
    part file of ``path``'s, ``<name>.replaced-<UTC time>``); None for a mark it did not write, or
    one that cannot be read. Only the names are taken: the commands said are of files beside the
    database, whatever other paths a mark names. Read as a run record is (:func:`db.run_records.read_record`:
    a FIFO of its name hung the writer's start; a regular file of a few KiB at most)."""
    found = read_record(restore_marker(path))
    lines = found[0].splitlines() if found is not None else []
    if len(lines) != 2:
        return None
    copy, replaced = (Path(line).name for line in lines)
    match = PART_RE.fullmatch(copy)
    if match is None or not copy.startswith(f".{path.name[:NAME_KEPT]}.{match['pid']}.") \
            or copy.endswith(("-journal", "-wal", "-shm")):
        return None
    kept = REPLACED_RE.fullmatch(replaced)
    if kept is None or kept["name"] != path.name or replaced.endswith(("-wal", "-shm")):
        return None
    return copy, replaced


def stopped_restore_copy(path: Path | None) -> Path | None:
    """The replaced database (its ``-wal`` and ``-shm`` after its name) that a ``db restore`` stopped
    mid-swap moved aside, when ``path`` (the file a link names) is missing and its mark, one the
    restore wrote, says so; None otherwise. Until that restore is finished (:func:`unfinished_restore`
    says how) it is the only copy of that database, not one to delete."""
    if path is None:
        return None
    path = Path(os.path.realpath(path))
    if os.path.lexists(path):
        return None
    named = _marked_names(path)
    return None if named is None else path.parent / named[1]


def unfinished_restore(path: Path | None) -> str | None:
    """Why nothing may make a new database at ``path``: it is missing, and its
    :func:`restore_marker` says a ``db restore`` was stopped (killed, a power cut) between moving the
    database aside and putting the backup's checked copy in its place; what to do, in words, with
    the commands that do it (each path quoted for a shell, the WAL and shared-memory files the moves
    left behind in them: a WAL of the replaced database left beside the restored copy is replayed
    into it). None otherwise (a mark beside a database in place is a restore stopped before or after
    its swap: nothing lost)."""
    if path is None:
        return None
    path = Path(os.path.realpath(path))  # a link's file: the restore replaces it, beside it
    if os.path.lexists(path):
        return None
    marker = restore_marker(path)
    if not os.path.lexists(marker):
        return None
    named = _marked_names(path)
    if named is None:
        return (f"the database {path} is missing, and {marker.name} beside it says a `python -m db restore` was "
                "stopped while it swapped the files, but it is not one that restore wrote (or it cannot be read): "
                f"before anything starts (a writer would make a new, empty database), put the database back as "
                f"{path.name} (the replaced one is kept beside it as {path.name}.replaced-<UTC time>), then remove "
                f"{marker.name}")

    def mv(source: Path, dest: Path) -> str:
        return f"mv {shlex.quote(str(source))} {shlex.quote(str(dest))}"
    copy, replaced = (path.parent / name for name in named)
    done = f"rm {shlex.quote(str(marker))}"
    left = [suffix for suffix in ("-wal", "-shm") if os.path.lexists(f"{path}{suffix}")]  # the replaced one's
    back = " && ".join([mv(replaced, path), *(mv(Path(f"{replaced}{suffix}"), Path(f"{path}{suffix}"))
                                              for suffix in ("-wal", "-shm") if os.path.lexists(f"{replaced}{suffix}")),
                        done])
    if copy.is_file():
        ahead = " && ".join([*(mv(Path(f"{path}{suffix}"), Path(f"{replaced}{suffix}")) for suffix in left),
                             mv(copy, path), done])
        ways = (f"put the backup's checked copy in place, `{ahead}` (its ids already continue after the replaced "
                f"database's); or go back to the replaced database, `{back}`")
    else:
        ways = f"its copy {copy.name} is gone: go back to the replaced database, `{back}`, and restore again"
    return (f"the database {path} is missing: a `python -m db restore` was stopped while it swapped the files "
            f"(said by {marker.name}), after it moved the database aside as {replaced.name}. "
            f"Before anything starts (a writer would make a new, empty database): {ways}")


def remove_stale_restore_mark(path: Path | None) -> bool:
    """Remove ``path``'s :func:`restore_marker` when the database (the file a link names) is in
    place: a restore killed before its first move or after the copy took the name left it, and it
    says nothing of that database. Kept, it outlived the restore, and once the database went missing
    later (moved after a kill, its WAL left) every refusal was that restore's, with its stale copy and
    a replaced database never made. Only under the writer lock, which a restore holds while it runs.
    Whether one was removed."""
    if path is None:
        return False
    real = Path(os.path.realpath(path))
    marker = restore_marker(real)
    if not os.path.lexists(real) or not os.path.lexists(marker):
        return False
    marker.unlink(missing_ok=True)
    sync_folder(real.parent)
    return True


def orphaned_journal(path: Path | None) -> str | None:
    """Why the writer must not open ``path``: it is not there but its WAL is, with frames in it. The
    database was moved or removed, and SQLite would make a new, empty one beside the old WAL (the
    next checkpoints then failed, "database disk image is malformed"): acknowledged writes in two
    files, the stack writing on into the new one (fault hunt as an operator)."""
    if path is None or path.exists():
        return None
    # SQLite keeps the WAL beside the file a symbolic link names, not beside the link; and the file goes
    # back there: `mv` onto the link replaces the link, the file then away from its WAL.
    real = Path(os.path.realpath(path))
    files = database_files(real)
    wal = files["wal"]
    try:
        size = wal.stat().st_size
    except OSError:
        return None
    if not size:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = " && ".join(f"mv {shlex.quote(str(one))} {shlex.quote(f'{one}.orphaned-{stamp}')}"
                        for one in (wal, files["shm"]) if os.path.lexists(one))
    named = f"{path}" if real == Path(os.path.abspath(path)) else f"{path} (through a symbolic link: the file {real})"
    return (f"the database {named} is missing but its WAL {wal.name} is there ({size} bytes of its writes): the "
            f"database was moved or removed, and a new one made beside that WAL would take the old one's pages "
            f"from it. Put the database back at {real}; or restore a backup (`python -m db restore BACKUP`: it "
            f"keeps that WAL aside); or, if it is gone for good, move the files it left aside (`{aside}`), then "
            "start again: a new database starts empty")


def folder_not_there(path: Path | None) -> str | None:
    """Why no database can be made at ``path``: it is missing, and the folder of the file it names
    through a symbolic link is not there, nor made by making ``path``'s folder by its name (as the
    writer does): the link itself names a file in a missing folder, or a folder on the way is a link
    that names nothing (a disk not mounted, a link mistyped) or a file. SQLite says only "unable to
    open database file", and doctor said to start the writer, which failed so."""
    if path is None or path.exists():
        return None
    named = Path(os.path.abspath(path))
    real = Path(os.path.realpath(named))
    if real.parent.is_dir():
        return None
    on_the_way = next(folder for folder in named.parents if os.path.lexists(folder))  # "/" at the latest
    if not os.path.islink(named) and on_the_way.is_dir():  # the folders made by name land in the real one
        return None
    return (f"the database {path} is missing, and the folder {real.parent} of the file it names is not there "
            f"(a disk not mounted, a symbolic link mistyped): nothing can make the database there; mount the disk or "
            "mend the link, or set DATABASE_URL to the database's path")


def new_database_refusal(path: Path | None) -> str | None:
    """Why nothing (the writer, ``db init``, ``db prepare``) may make a new database at ``path``, and
    what to do, or None: the one rule for a missing database, :func:`unfinished_restore` first (its
    commands move the WAL left beside it too), then :func:`orphaned_journal`, then
    :func:`folder_not_there`."""
    return unfinished_restore(path) or orphaned_journal(path) or folder_not_there(path)


def file_sizes(path: Path) -> dict[str, int | None]:
    """The sizes of :func:`database_files`, None for one that is not there."""
    sizes: dict[str, int | None] = {}
    for kind, file in database_files(path).items():
        try:
            sizes[kind] = file.stat().st_size
        except FileNotFoundError:
            sizes[kind] = None
    return sizes


def discard_part(part: Path) -> None:
    """Remove a part file :func:`part_file` made, and the SQLite journals a copy into it left."""
    for leftover in (part, *(Path(f"{part}-{suffix}") for suffix in ("journal", "wal", "shm"))):
        leftover.unlink(missing_ok=True)


def remove_orphans(folder: Path) -> None:
    """Remove the part files (and their journals) in ``folder`` whose writer is not running."""
    try:
        names = [entry.name for entry in os.scandir(folder) if entry.name.startswith(".")]
    except OSError:
        return
    for name in names:
        match = PART_RE.fullmatch(name)
        if match is not None and not psutil.pid_exists(int(match["pid"])):
            (folder / name).unlink(missing_ok=True)  # another backup may remove it first


#: What a path that is neither a regular file nor a symbolic link is, in words, by its type
#: (``stat.S_IFMT``): the one table of :func:`check_replaceable`'s refusals and of the secret files'
#: (:func:`db.config.read_or_create_secret`).
FILE_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
              stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def check_replaceable(dest: Path) -> None:
    """ValueError unless ``dest`` is free, a file or a symbolic link (the link itself is replaced):
    a rename over a FIFO, a socket or a device replaces it, and ``db backup /dev/null --force``, run
    as root, replaced the machine's /dev/null with a copy of the database."""
    try:
        mode = os.lstat(dest).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    kind = FILE_KINDS.get(stat.S_IFMT(mode))
    if kind is not None:
        raise ValueError(f"{dest} is {kind}, not a file; a backup only replaces a file (with --force)")


def sync_file(path: Path) -> None:
    """fsync ``path``'s content (a no-op cost when its writer synced it already)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """fsync ``folder`` itself: a name made, renamed or removed in it outlasts a power cut only then.
    A file's own fsync keeps its bytes, not its name: without this a backup reported written, or a
    restored database, could be gone after the machine lost power a few seconds later (on ext4 the
    journal commits names about every 5 s), and a restore's half-done moves could leave no database
    under its name at all. A filesystem that cannot sync a folder (EINVAL) is let be, and so is a
    folder this user may write in but not read (mode -wx: it cannot be opened to be synced): the file
    is in place, as it always was, and failing for it made a retry say "exists"."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def make_folder(folder: Path) -> None:
    """``folder`` made if missing, with its missing parents, each mode 0700 (``mkdir -p`` gives the
    parents the umask's mode), and each one made named durably: its parent synced after
    (:func:`sync_folder`). A backup's, a restored database's or a spooled batch's folder made for it
    would otherwise outlast a power cut only once the filesystem's journal commits, seconds after
    the file in it was reported synced, and take that file with it. FileExistsError or
    NotADirectoryError when a file is in the way, as ``mkdir`` says it."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(mode=0o700, exist_ok=True)  # exist_ok: another process made it meanwhile
        sync_folder(made.parent)


def put_in_place(part: Path, dest: Path, *, overwrite: bool = False) -> None:
    """Give ``part`` the name ``dest``, durably: its content synced first, its folder after
    (:func:`sync_folder`). Without ``overwrite``, FileExistsError when ``dest`` exists,
    decided by the link itself, so a file that took the name meanwhile stays as it is (``part`` is
    left for the caller to remove). A filesystem without hard links gets a check, then the rename.
    With ``overwrite``, only a file (or a link) is replaced (:func:`check_replaceable`)."""
    sync_file(part)
    if overwrite:
        check_replaceable(dest)
        os.replace(part, dest)
    else:
        try:
            os.link(part, dest)
        except FileExistsError:
            raise FileExistsError(f"{dest} exists; choose another path or pass --force") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP):  # what a filesystem without hard links says
                raise
            if os.path.lexists(dest):
                raise FileExistsError(f"{dest} exists; choose another path or pass --force") from None
            os.replace(part, dest)
        else:
            part.unlink()
    sync_folder(dest.parent)
