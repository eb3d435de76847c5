"""``python -m db restore BACKUP``: a backup in the database's place, and what the restore says of it.

The restore itself is :func:`db.restore.restore` (an SQLite ``.db``) or
:func:`db.server_restore.restore_dump` (a PostgreSQL ``.dump``); here, the command around them: a stop
taken as Ctrl-C so that their clean-up runs, and the words of what each did (the ids continued, the
trades the backup has not, the trades it has open that were closed since).
"""
from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from db.config import Settings, check_home, load_settings
from db.sizes import human_bytes


def _trades_lost_words(lost: list[int] | None) -> str:
    if lost is None:
        return ""
    which = f"trade {lost[0]}" if lost[0] == lost[1] else f"trades {lost[0]} to {lost[1]}"
    return (f". WARNING: {which}, opened after the backup, {'is' if lost[0] == lost[1] else 'are'} not in it "
            "(a client holding one is told it does not exist; its id is not given to a new trade)")


def _trades_reopened_words(reopened: list[int] | str) -> str:
    """The trades a restore put back open (closed after the backup), named: the monitor manages them again.
    A string: why the replaced database's trades could not be read (SQLite's, a damaged page)."""
    if isinstance(reopened, str):
        return (f". WARNING: the replaced database's trades could not be read ({reopened}): trades closed after "
                "the backup may be open in it, and the monitor manages them again (stops, targets) once the "
                "stack runs; close them again if they are to stay closed")
    if not reopened:
        return ""
    named = [str(i) for i in reopened[:10]] + ([f"{len(reopened) - 10} more"] if len(reopened) > 10 else [])
    one = len(reopened) == 1
    which = f"trade {named[0]}" if one else f"trades {', '.join(named[:-1])} and {named[-1]}"
    it, are = ("it", "is") if one else ("them", "are")
    return (f". WARNING: {which}, closed after the backup, {are} open in it: the monitor manages {it} again "
            f"(stops, targets) once the stack runs; close {it} again if {'it is' if one else 'they are'} to stay "
            "closed")


def _ids_continued_words(continued: dict[str, int]) -> str:
    """The counters (SQLite's) or sequences (PostgreSQL's) a restore set on, by name."""
    if not continued:
        return ""
    return ("; ids continue after the replaced database's (" + ", ".join(
        f"{name} {value}" for name, value in sorted(continued.items())) + "), so none it gave after the backup is "
        "given again")


def _restore_dump(settings: Settings, source: Path, keep: bool, done: threading.Event) -> int:
    from db.server_restore import restore_dump

    result = restore_dump(settings, source, keep=keep, done=done)
    ids = _ids_continued_words(result["ids_continued"])
    kept = f"; the database it replaced is kept as {result['replaced']}" if result["replaced"] else ""
    if result["empty"]:
        kept = "; the database had none of its tables (a new one), so nothing was replaced and no copy was kept"
    print(f"restored {result['source']} into {result['restored']} ({result['entries']} entries, in one "
          f"transaction){kept}{ids}{_trades_lost_words(result['trades_lost'])}"
          f"{_trades_reopened_words(result['trades_reopened'])}. Start the stack again on each "
          "host: make run")
    return 0


def _stop_as_ctrl_c(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def cmd_restore(args: argparse.Namespace) -> int:
    """A restore stopped (Ctrl-C; SIGTERM by pid or SIGHUP, taken as Ctrl-C so that its clean-up runs: by
    default they ended it with not a word, its temporary files left) says where it stopped: a
    traceback said nothing of the database. The SQLite swap and the PostgreSQL COMMIT end first
    (db.restore; db.server_restore says a COMMIT it could not see end)."""
    from db.restore import STOP_SIGNALS

    for sig in STOP_SIGNALS - {signal.SIGINT}:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup python -m db restore` asked it to go on
            signal.signal(sig, _stop_as_ctrl_c)
    done = threading.Event()  # set by the restore as the backup takes the database's place
    try:
        return _restore(args, done)
    except KeyboardInterrupt:
        if done.is_set():
            raise ValueError("stopped as it ended, the backup restored (what it says of the ids, of trades the "
                             "backup has not and of trades closed after the backup that it has open, which the "
                             "monitor manages again, was not said); start the stack again: make run") from None
        raise ValueError("stopped before it changed anything: the database is the one it was (run the restore "
                         "again to restore)") from None


def _restore(args: argparse.Namespace, done: threading.Event) -> int:
    from db.restore import restore

    settings = load_settings()
    check_home(settings)
    if settings.database_path is None:
        return _restore_dump(settings, Path(args.backup), keep=not args.no_copy, done=done)
    # An SQLite restore in a home whose writer writes a server's database (a shell without its
    # DATABASE_URL): a .dump was "not for this SQLite stack", and a .db went into a file the stack does
    # not use, "restored". Doctor's rule refuses it, as `db init` does.
    from db.served_database import served_database, wrong_database_refusal

    refused = wrong_database_refusal(settings, served_database(settings))
    if refused is not None:
        raise ValueError(refused)
    if args.no_copy:
        raise ValueError("--no-copy is for PostgreSQL; on SQLite the replaced file is always kept (moved aside)")
    result = restore(settings, Path(args.backup), done)
    kept = (f"; the database it replaced is kept as {result['replaced']} (with its -wal and -shm, if it had them)"
            if result["replaced"] else "")
    if result["ids_unread"] is not None:
        ids = (f"; the replaced database could not be read ({result['ids_unread']}): ids it gave after the backup "
               "(ticks', trades') may be given again to new rows, so a client must not act on a trade id it was "
               "given after the backup")
    else:
        ids = _ids_continued_words(result["ids_continued"])
    ids += _trades_lost_words(result["trades_lost"]) + _trades_reopened_words(result["trades_reopened"])
    print(f"restored {result['source']} into {result['restored']} ({human_bytes(result['bytes'])}, integrity "
          f"ok){kept}{ids}. Start the stack again: make run")
    return 0
