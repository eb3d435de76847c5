"""Health of the database, taken by any process without writing.

It lists which processes hold the database files open, by pid
(:mod:`db.holders`: the safe replacement for the seed's "stop all Python
processes"), and what each finding means and what to do.

Like :mod:`db.engine`, this module knows the database is SQLite; on a
PostgreSQL server it reports what :mod:`db.server` finds instead (reachable
or not, size, connections by application_name, the writer lock's holder), and
backs up with ``pg_dump``.
"""
from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

from db.backups import damaged_file_words, replaced_copies_finding, restore_advice
from db.circusd import (
    circusctl_command,
    damaged_file_steps,
    stopped_watcher_findings,
    unreachable_circusd,
    writer_down_advice,
    writer_restart_command,
    writer_start_after_fix,
)
from db.config import Settings
from db.engine import DAMAGED_FILE_ADVICE, check_findings, connect_read_only, damaged_database, display_url
from db.errors import READ_GRANT, MaintenanceFailed, WriterError, server_trouble, server_trouble_words
from db.files import database_files, file_sizes
from db.holders import holders
from db.job_findings import job_findings
from db.leader import LEADER_NAMES, file_leader, leader_lock_path
from db.lock import holder_command, read_lock_holder
from db.private_files import private_file_findings
from db.served_database import home_database_finding
from db.server import server_status
from db.server_wait import last_refusal, login_refused, login_user
from db.sizes import human_bytes
from db.timestamps import utc
from db.wal_readers import pids_in_read_transactions


def pragmas(path: Path, quick_check: bool = False) -> dict[str, Any]:
    con = connect_read_only(path)
    try:
        out: dict[str, Any] = {}
        for name in ("journal_mode", "page_count", "page_size", "freelist_count"):
            out[name] = con.execute(f"PRAGMA {name}").fetchone()[0]
        # The schema's version is recorded in its own table (db.schema); PRAGMA user_version is not
        # used (always 0: shown, it read as a second, contradicting version).
        try:
            out["schema_version"] = con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        except sqlite3.OperationalError:  # no such table: a database the schema was never applied to
            out["schema_version"] = None
        if quick_check:
            started = time.perf_counter()
            # One row may hold a whole tree's findings, a line each (a page's 100 cells: a doctor line of 100)
            rows = check_findings(con, "quick_check")
            out["quick_check"] = {"ok": rows == ["ok"], "messages": rows[:20],
                                  "ms": round((time.perf_counter() - started) * 1000, 1)}
        return out
    finally:
        con.close()


def integrity(settings: Settings, timeout: float = 600.0, create: bool = True) -> dict[str, Any]:
    """The quick integrity check of ``settings``' database, read-only, for the jobs worker and the
    console alike: SQLite's ``PRAGMA quick_check`` (``{"ok", "messages", "ms", "method"}``), or on
    PostgreSQL amcheck's ``bt_index_check`` on every index (:func:`db.server.amcheck`; its
    ``problems`` are the messages, and ``skipped`` says why a check could not be made: a check we
    cannot make is not a failed one; ``timeout`` and ``create`` as there). Raises
    ``sqlite3.Error``/``OSError``, or ``RuntimeError`` with the server's words (never the URL) when
    the database cannot be read at all."""
    if settings.database_path is None:
        import psycopg

        from db.server import amcheck, scrub

        try:
            check = amcheck(settings, timeout, create)
        except psycopg.Error as e:
            raise MaintenanceFailed(scrub(" ".join(str(e).split()), settings.database_url)) from None
        return {"method": "amcheck", "messages": check.pop("problems", []), **check}
    check = pragmas(settings.database_path, quick_check=True)["quick_check"]
    return {"method": "quick_check", **check}


def integrity_check(path: Path) -> list[str]:
    """``PRAGMA integrity_check``: ``["ok"]`` when the file is sound."""
    con = connect_read_only(path)
    try:
        return check_findings(con)
    finally:
        con.close()


def disk_space(settings: Settings) -> list[dict[str, Any]]:
    """Free space of the filesystem holding the database, and of the one holding TICKSTACK_HOME
    (spool, logs, backups) when it is another. ``free`` is what an unprivileged process may still
    use (``f_bavail``), the figure that runs out first; ``level`` is ``ok``, ``warn`` below
    ``TICKSTACK_DISK_WARN_PCT`` percent free, ``fail`` below a tenth of that (the writer is about
    to answer ``StorageFull``)."""
    places = [("database", settings.database_path.parent)] if settings.database_path is not None else []
    places.append(("runtime folder", settings.home))
    out: list[dict[str, Any]] = []
    devices: set[int] = set()
    for what, path in places:
        while not path.exists() and path != path.parent:  # not created yet: the disk it will be on
            path = path.parent
        try:
            device = path.stat().st_dev
            usage = shutil.disk_usage(path)
        except OSError as e:
            out.append({"what": what, "path": str(path), "error": str(e), "level": "warn"})
            continue
        if device in devices:
            continue
        devices.add(device)
        free_pct = 100.0 * usage.free / usage.total if usage.total else 0.0
        level = ("fail" if free_pct < settings.disk_warn_pct / 10 else
                 "warn" if free_pct < settings.disk_warn_pct else "ok")
        out.append({"what": what, "path": str(path), "total": usage.total, "free": usage.free,
                    "free_pct": round(free_pct, 2), "warn_pct": settings.disk_warn_pct, "level": level})
    return out


def snapshot(settings: Settings, *, quick_check: bool = False, writer_timeout: float = 1.0,
             known_pids: set[int] | None = None) -> dict[str, Any]:
    """Everything a person asks when the database feels slow, in one dict.
    Never writes and never raises for a sick database: it reports it."""
    from db.client import WriterClient  # here, so importing health stays cheap

    path = settings.database_path
    snap: dict[str, Any] = {"taken_at_ms": int(time.time() * 1000), "database_url": display_url(settings.database_url)}
    writer: dict[str, Any] = {"up": False, "pid": None}
    if path is not None:
        writer["pid"] = read_lock_holder(settings.writer_lock_path)
        command = holder_command(writer["pid"])
        if command is not None:  # a restore holds it while it runs: not a writer to restart
            writer["holder_command"] = command
        snap["leaders"] = {name: file_leader(leader_lock_path(path, name)) for name in LEADER_NAMES}
    else:
        snap["server"] = server = server_status(settings)
        snap["leaders"] = server.get("leaders") or {}
        lock = server.get("writer_lock") or {}
        if lock.get("held"):  # this home's writer, or another stack's (here or on another host)
            ours = read_lock_holder(settings.writer_lock_path)
            # The lock is this host's (server_status asks for settings.host's): ours when the pid is.
            if ours is not None and ours == lock.get("writer_pid"):
                writer["pid"] = ours
            else:
                writer["lock_holder"] = lock.get("text")
        else:  # this home's writer may run and wait for the server's lock (a server down, or refusing it)
            writer["waiting_pid"] = read_lock_holder(settings.writer_lock_path)
    client = WriterClient(settings=settings, deadline=writer_timeout)
    try:
        ping = client.ping(timeout=writer_timeout)
        writer.update(up=True, pid=ping["pid"], ping_ms=ping["latency_ms"], database=ping.get("database"),
                      stats=client.stats(writer_timeout))
    except WriterError as e:
        writer["error"] = str(e)
    finally:
        client.close()
    if not writer["up"]:  # why this home's last writer could not start, as it said (PostgreSQL only)
        said = last_refusal(settings)
        if said is not None:
            writer["refused"] = said
    snap["writer"] = writer
    snap["disk"] = disk_space(settings)
    stats = writer.get("stats") or {}  # the same keys on both databases (pages read them)
    snap["lock_errors"] = stats.get("lock_errors", 0)
    snap["last_checkpoint"] = stats.get("last_checkpoint")
    if path is None:
        if quick_check and snap["server"]["reachable"]:  # amcheck, as the jobs worker runs it
            try:
                snap["integrity"] = integrity(settings, timeout=60.0, create=False)
            except (RuntimeError, OSError) as e:  # not made: no verdict on the indexes (_integrity_findings)
                snap["integrity"] = {"ok": False, "method": "amcheck", "messages": [], "not_made": str(e)}
        return snap
    snap["path"] = str(path)
    snap["files"] = file_sizes(path)
    try:
        snap["pragmas"] = pragmas(path, quick_check=quick_check)
    except (sqlite3.Error, FileNotFoundError) as e:
        snap["pragmas"] = {"error": str(e), "damaged": damaged_database(e)}
    snap["processes"] = holders(path, writer.get("pid"), settings.home, known_pids, writer.get("holder_command"))
    reading = pids_in_read_transactions(database_files(path)["shm"])
    for proc in snap["processes"]:  # None: not known (no -shm file, no /proc/locks)
        proc["in_read_transaction"] = None if reading is None else proc["pid"] in reading
    if reading is not None:  # and those not listed: their open files are not ours to see (another user's, a
        # container's, its paths its own), but /proc/locks names them all
        snap["unlisted_read_transactions"] = sorted(reading - {p["pid"] for p in snap["processes"]}
                                                    - {writer.get("pid")})
    return snap


def diagnose(snap: dict[str, Any], settings: Settings) -> list[tuple[str, str]]:
    """Plain-word findings from a snapshot: (level, text) with what to do.
    Levels: ok, warn, fail."""
    out: list[tuple[str, str]] = []
    prag = snap.get("pragmas", {})
    qc = prag.get("quick_check")
    damaged = bool(prag.get("damaged")) or (qc is not None and not qc["ok"])  # an SQLite file's
    # Its restore named once (a listing of the backups folder), for each finding that says it.
    restore = restore_advice(settings) if damaged else None
    cut_off = unreachable_circusd(settings.circus_endpoint)
    if cut_off is not None:  # the stack runs on, out of circusctl's and the console's reach
        out.append(("fail", f"{cut_off}."))  # "circusd pid N ...": the program's name, as it is written
    writer = snap["writer"]
    other = _other_database(snap, settings)
    if other is not None:  # every finding below would be about a database the stack does not use
        out.append(other)
        if other[0] == "fail":
            return out
    out.extend(_server_findings(snap, settings))
    refused = writer.get("refused") if not writer["up"] else None
    # Down for it: the login, not an amcheck that "could not be made", is the news (up: the writer's
    # URL is not this process's, and the amcheck line says whose login it was).
    own_login = _own_login_refused(snap, settings) if not writer["up"] else None
    if own_login is not None and refused is None:  # this process's DATABASE_URL, the writer's may differ
        out.append(own_login)
    elif own_login is None:
        out.extend(_integrity_findings(snap, settings))
    if writer["up"]:
        st = writer.get("stats", {})
        p99 = st.get("commit_p99_ms")  # None until its first commit (just started)
        commits = f"commit p99 {p99} ms" if p99 is not None else "no commit yet"
        out.append(("ok", f"The writer (pid {writer['pid']}) answers in {writer['ping_ms']:.1f} ms; queue depth "
                          f"{st.get('queue_depth')}, {commits}."))
        if st.get("busy_replies"):
            out.append(("warn", f"The writer refused {st['busy_replies']} requests as busy since it started: "
                                "producers send faster than it commits. Send larger batches (pipeline), or raise "
                                "TICKSTACK_WRITER_MAX_QUEUE."))
    elif writer.get("holder_command"):
        out.append(("fail", f"`{writer['holder_command']}` (pid {writer['pid']}) holds the writer lock, not a writer: "
                            "no writer starts while it runs (a restore replaces the database), so writes wait "
                            "(clients retry until their deadline). Once it has ended, start the stack: `make run`."))
    elif writer.get("pid"):
        out.append(("fail", f"The writer (pid {writer['pid']}) holds the writer lock but does not answer: it may be "
                            "stuck. Look at its log, then restart it: "
                            f"`{circusctl_command(settings.circus_endpoint, 'restart', 'writer')}`."))
    elif writer.get("waiting_pid"):
        # circus's next try of a refused start waits too, until the server refuses it again: the refusal,
        # which only a writer that reached the server clears, is the news then (it was left out).
        then = (f"Its last start was refused: {_refusal_words(refused, settings)}" if refused is not None else
                "See the server's finding; it serves once the server lets it in.")
        out.append(("fail", f"The writer (pid {writer['waiting_pid']}) runs but does not serve yet: it waits for the "
                            "database server (its writer lock there), so writes wait (clients retry until their "
                            f"deadline). {then}"))
    elif writer.get("lock_holder"):
        # The server's lock is per host (TICKSTACK_HOST), and this home's writer does not hold it: a stack
        # of another home with the same host name does. Writes sent here go to nobody (they do not reach
        # that stack's writer): "writes go to that stack's writer" sent a user to the wrong fix.
        out.append(("fail", f"This stack's writer cannot run: a writer with the same TICKSTACK_HOST "
                            f"({settings.host!r}) in another home holds this database's writer lock for that host "
                            f"({writer['lock_holder']}); one writer per host name and database, so writes to this "
                            "stack reach no writer (its API answers 503 writer_unavailable). Give this stack its own "
                            f"TICKSTACK_HOST (`{circusctl_command(settings.circus_endpoint, 'quit')}`, then `make run` "
                            "with it set), or stop the other stack's writer."))
    elif refused is not None:  # no writer runs, and its last start was refused: that, not "start it", is the news
        # (after another stack's writer: the refusal may be over by then)
        out.append(("fail", f"The writer cannot start: {_refusal_words(refused, settings)}"))
    else:  # by what circusd says: `start writer` cannot work without it, `make run` would refuse with it
        # On a damaged file, a restore first: a writer started on it fails every write touching the damage.
        out.append(("fail", writer_down_advice(settings, restore_first=restore)))
    if not damaged:  # a damaged file comes first: the stack is to be stopped for it, not its workers started
        out.extend(stopped_watcher_findings(settings))
    out.extend(_disk_findings(snap, settings))
    out.extend(private_file_findings(settings))
    if snap.get("lock_errors"):
        out.append(("fail", f"The writer met {snap['lock_errors']} 'database is locked' errors: another process "
                            "writes the file. See the processes below."))
    if "error" in prag:
        damage = f": {damaged_file_words(settings, restore)}." if prag.get("damaged") else ""
        out.append(("fail", f"Cannot read the database: {prag['error']}{damage}"))
        return out
    if "path" in snap and prag.get("journal_mode") != "wal":  # SQLite's; a server has no journal mode
        out.append(("warn", f"Journal mode is {prag.get('journal_mode')}, not WAL: readers and the writer block "
                            "each other. The writer sets WAL when it starts."))
    if qc is not None:
        out.append(("ok", "quick_check: ok.") if qc["ok"] else
                   ("fail", f"quick_check found problems: {'; '.join(qc['messages'][:3])}: "
                            f"{damaged_file_words(settings, restore)}."))
    wal = (snap.get("files") or {}).get("wal") or 0
    if wal > 2 * settings.journal_size_limit:
        out.append(("warn", _wal_words(wal, [p for p in snap.get("processes", []) if p["role"] != "writer"],
                                       snap.get("unlisted_read_transactions"))))
    for p in snap.get("processes", []):
        if p["role"] == "rogue-writer":
            out.append(("fail", f"pid {p['pid']} ({p['cmdline'][:80]}) has the database open FOR WRITING and is not "
                                "the writer: that is what causes 'database is locked'. Stop that program yourself "
                                f"(`kill {p['pid']}`) and send its writes through db.client.WriterClient."))
        elif p["role"] == "unknown":
            out.append(("warn", f"pid {p['pid']} ({p['cmdline'][:80]}) has the database open and is not part of "
                                "tickstack. Reads are harmless, but a long read holds back checkpoints."))
    if not damaged and "error" not in prag and (snap.get("server") or {}).get("reachable", True):
        out.extend(job_findings(settings))  # a failed backup (what a restore would take), a held-back retention
    if not any(level != "ok" for level, _ in out):
        out.append(("ok", "No problem found."))
    return out


def _wal_words(wal: int, readers: list[dict[str, Any]], unlisted: list[int] | None) -> str:
    """The WAL's warning: the readers whose read transaction holds it back, when they are known
    (``unlisted``: the pids of those whose open files this process may not see; None when who is in
    a read transaction cannot be known: no ``-shm`` file, no ``/proc/locks``)."""
    size = f"The WAL is {human_bytes(wal)}"
    if unlisted is None or any(p.get("in_read_transaction") is None for p in readers):  # any may be the one
        pids = f" (pids {[p['pid'] for p in readers]})" if readers else ""
        return (f"{size}: checkpoints are not keeping up, usually because readers keep long transactions "
                f"open{pids}. `python -m db checkpoint`.")
    holding = [f"pid {p['pid']} ({p['cmdline'][:80]})" for p in readers if p["in_read_transaction"]]
    # pid 0: a process of another pid namespace (a container's), which /proc/locks cannot name here.
    holding += [f"pid {pid} (a process whose open files this check may not see: another user's, or a container's)"
                if pid > 0 else "a process of another pid namespace (a container's)" for pid in unlisted]
    if not holding:
        return (f"{size}, and no reader is in a read transaction now: `python -m db checkpoint` shrinks it. If it "
                "grows again, a reader keeps long transactions open from time to time.")
    them = ("that read (or restart that process)" if len(holding) == 1 else
            "those reads (or restart those processes)")
    return (f"{size}: a read transaction held open keeps checkpoints from shrinking it, in {'; '.join(holding)}. "
            f"End {them}, then `python -m db checkpoint`.")


def _other_database(snap: dict[str, Any], settings: Settings) -> tuple[str, str] | None:
    """A finding when the home's writer writes another database than this process's settings name: a
    shell with ``TICKSTACK_HOME`` set for a stack on PostgreSQL, and not ``DATABASE_URL``, read a
    SQLite file that is not there and advised ``db init``, which would make one (a new user's run,
    round 40). Another kind of database: fail, and nothing else is said. The same kind elsewhere
    (another file, host or database name): a warning, since one server or folder has several names. No
    writer answering (stopped, or waiting for its server), by what it recorded at its last start."""
    served = snap["writer"].get("database") if snap["writer"]["up"] else None
    return home_database_finding(settings.run_dir, served, snap.get("database_url"))


def _refusal_words(refused: dict[str, Any], settings: Settings) -> str:
    """A writer's last refused start (:func:`db.server_wait.last_refusal`), what to fix and how to start
    it again, in words."""
    at = utc((refused.get("at") or 0) * 1000, seconds=True)
    return (f"{refused['what']} at its last start ({at}). {refused['fix'][:1].upper()}{refused['fix'][1:]}, then "
            f"start the writer again: {writer_start_after_fix(settings, refused['fix'])}.")


def _own_login_refused(snap: dict[str, Any], settings: Settings) -> tuple[str, str] | None:
    """A finding when doctor's own amcheck could not log in as DATABASE_URL's role for a login the
    server refused: said as that, with the fix, not as an integrity check that "could not be made"."""
    not_made = str((snap.get("integrity") or {}).get("not_made") or "")
    if not not_made or server_trouble(not_made) != "refuses the login":
        return None
    what, fix = login_refused(not_made, "DATABASE_URL", login_user(settings.database_url, not_made))
    return ("fail", f"{what[:1].upper()}{what[1:]} ({not_made}): {fix}, then start the writer again: "
                    f"{writer_restart_command(settings)}. (No amcheck either: it logs in as that role.)")


def _integrity_findings(snap: dict[str, Any], settings: Settings) -> list[tuple[str, str]]:
    """A server's amcheck (``snapshot(quick_check=True)``): ok, problems (a failure), or not made."""
    check = snap.get("integrity")
    if check is None:
        return []
    if "skipped" in check:
        return [("warn", f"No integrity check: {check['skipped']}.")]
    if "not_made" in check:  # DATABASE_URL's role cannot log in, the session ended: no verdict, no restore advised
        return [("fail", f"amcheck could not be made (it logs in as DATABASE_URL's role): {check['not_made']}")]
    if check["ok"]:
        return [("ok", f"amcheck of {check.get('indexes', 0)} indexes: ok.")]
    return [("fail", f"amcheck found problems: {'; '.join(map(str, check['messages'][:3]))}. REINDEX the index it "
                     f"names (it is rebuilt from its table), or stop the stack on every host and "
                     f"{restore_advice(settings)}.")]


def _server_findings(snap: dict[str, Any], settings: Settings) -> list[tuple[str, str]]:
    """A PostgreSQL server: down is a failure; up, its size and connections (near max_connections: warn)."""
    server = snap.get("server")
    if server is None:
        return []
    if not server["reachable"]:
        # server_status asks with the readers' URL
        return [("fail", server_trouble_words(str(server.get("error") or ""), settings.read_url_variable))]
    ranked = sorted(server["by_application"].items(), key=lambda kv: -kv[1])
    apps = ", ".join(f"{n} {name}" for name, n in ranked[:6])
    if len(ranked) > 6:  # the total counts them all: say the list does not
        apps += f", and {sum(n for _name, n in ranked[6:])} more under {len(ranked) - 6} other names"
    out = [("ok", f"The database server answers in {server['ping_ms']:.1f} ms (PostgreSQL {server['version']}): "
                  f"database {human_bytes(server['size_bytes'])}, {server['connections']} connections ({apps}); "
                  f"{server['server_connections']} of max_connections {server['max_connections']} on the server.")]
    if server.get("unreadable"):
        tables = server["unreadable"]
        out.append(("fail", f"{settings.read_url_variable}'s role may not read {len(tables)} of the stack's tables "
                            f"({', '.join(tables[:8])}{', ...' if len(tables) > 8 else ''}): the API, the console and "
                            f"the workers fail on them. As a superuser, in the database: {READ_GRANT} (README, "
                            "PostgreSQL: the roles)."))
    if server["server_connections"] > 0.8 * server["max_connections"]:
        out.append(("warn", f"The server has {server['server_connections']} of its {server['max_connections']} "
                            "connections in use: new ones will be refused soon. Find who holds them above, or "
                            "raise max_connections (or put PgBouncer in front, in session pooling mode only: "
                            "the writer lock and the leaders are session advisory locks)."))
    return out


#: A full disk the writer met this recently is doctor's FAIL (a warning after).
STORAGE_FULL_FAIL_S = 60


#: Seconds every batch must have failed to commit before health and doctor say so: one batch that lost
#: a race is no state of the writer.
COMMITS_FAILING_S = 2.0


def writes_refused(stats: dict[str, Any] | None) -> str | None:
    """Why the writer refuses writes now, from its stats (``ping``'s ``stats``): its database files
    removed or moved under it (every write), or its disk full (``disk_full``: no write has committed
    since one was refused for it; one large batch refused while small ones fit is not that); None when
    it takes writes. /api/health answered ``ok`` meanwhile (fault hunt, round 39)."""
    stats = stats or {}
    if stats.get("journal_removed"):
        return str(stats["journal_removed"])
    last = stats.get("last_storage_full")
    if stats.get("disk_full") and last:
        return f"its disk is full ({last['reason']}): writes wait for space"
    return commits_failing(stats)


def commits_failing(stats: dict[str, Any]) -> str | None:
    """Since when no batch commits, and why (:data:`COMMITS_FAILING_S` at least), from the writer's stats."""
    failing, why = stats.get("commits_failing_s"), stats.get("last_commit_failure")
    if failing is None or failing < COMMITS_FAILING_S or not why:
        return None
    return (f"no batch has committed for {failing:.0f} s ({why['reason']}): every write is answered retryably "
            "and nothing is applied; see the writer's log")


def _disk_findings(snap: dict[str, Any], settings: Settings) -> list[tuple[str, str]]:
    """Free space, warned about before it runs out, and a full disk the writer met."""
    out: list[tuple[str, str]] = []
    for d in snap.get("disk", []):
        if "error" in d:
            out.append(("warn", f"Cannot read the free space of the {d['what']} ({d['path']}): {d['error']}."))
        elif d["level"] == "ok":
            out.append(("ok", f"Disk of the {d['what']}: {human_bytes(d['free'])} free of {human_bytes(d['total'])} "
                              f"({d['free_pct']:.1f} %)."))
        else:
            state = "almost full" if d["level"] == "fail" else "filling up"
            out.append((d["level"], f"Disk of the {d['what']} ({d['path']}) is {state}: {human_bytes(d['free'])} "
                                    f"free of {human_bytes(d['total'])} ({d['free_pct']:.1f} %, warning below "
                                    f"{d['warn_pct']:g} %, TICKSTACK_DISK_WARN_PCT). When it is full the writer "
                                    "refuses writes (StorageFull) and the ingestor holds ticks in memory. Free "
                                    "space: delete old backups (TICKSTACK_BACKUP_KEEP), shorten "
                                    "TICKSTACK_RETENTION_DAYS, or move TICKSTACK_HOME to a larger disk."))
    low = any(d.get("level") not in (None, "ok") for d in snap.get("disk", []))
    out.extend(replaced_copies_finding(settings, low))
    stats = snap["writer"].get("stats") or {}
    failing = commits_failing(stats)
    if stats.get("journal_removed"):
        out.append(("fail", f"The writer refuses every write: {stats['journal_removed']}."))
    elif failing is not None and not stats.get("disk_full"):  # a full disk has its own finding below
        out.append(("fail", f"The writer's commits fail: {failing}. " + (
            f"{DAMAGED_FILE_ADVICE}; then {damaged_file_steps(settings, restore_advice(settings))}."
            if stats["last_commit_failure"].get("damaged") else
            "A disk turned read-only after errors (`dmesg`) or failing needs the stack stopped and the disk mended.")))
    last = stats.get("last_storage_full")
    if last:
        ago_s = max(0.0, time.time() - last["at_ms"] / 1000)
        level = "fail" if ago_s < STORAGE_FULL_FAIL_S else "warn"
        out.append((level, f"The writer refused {stats.get('storage_full', 0)} writes since it started because the "
                           f"disk was full, the last {ago_s:.0f} s ago ({last['reason']}). Nothing of them was "
                           "written; clients retry, and writes resume by themselves once space is freed."))
    return out
