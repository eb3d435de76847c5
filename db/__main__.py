"""``python -m db``: look after the database from the command line.

    python -m db prepare           create the runtime folder, check the settings
    python -m db init              create the runtime folder and the schema
    python -m db restore BACKUP    put a backup in the database's place (the stack stopped; .db or .dump)
    python -m db health [--json]   a snapshot: files, pragmas, writer, processes
    python -m db doctor            the same, in plain words, with what to do
    python -m db checkpoint        ask the writer to checkpoint (TRUNCATE)
    python -m db backup PATH       consistent online copy while the stack runs
    python -m db settings          every setting: variable, default, meaning (Markdown)

Exit codes: 0 fine, 1 a problem found or the command failed, 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import sys
from pathlib import Path

from db.config import (
    PASSWORD_FILE,
    ConfigError,
    Settings,
    check_home,
    ensure_home,
    home_for_circus_problem,
    load_settings,
)
from db.errors import WriterError, server_trouble
from db.files import new_database_refusal, touch_private
from db.parsers import MAX_CLIENT_DEADLINE_S, number_flag, path_flag
from db.restore_command import cmd_restore
from db.sizes import human_bytes


def _human_bytes(n: int | None) -> str:
    return "-" if n is None else human_bytes(n)


#: How long ``prepare`` (``make run``) waits for a stack that is quitting: circus gives its slowest
#: watcher 45 s (the writer's graceful_timeout).
STOPPING_WAIT_S = 60.0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Before circusd (``make run``): the runtime folder, the settings, and nothing of an earlier
    start in the way (a live circusd, a stale pid file, orphans, the writer lock, the ports)."""
    import psutil

    from db.circusd import circusctl_command, circusd_pidfile, live_circusd, wait_while_stopping, watchers_stopping
    from db.preflight import (
        blockers,
        check_socket_paths,
        clear_stale_pidfile,
        foreign_commands,
        orphans,
        owner_login_refused,
        refusal,
        wait_for_orphans,
    )

    settings = load_settings()  # the writer's socket path is a setting: checked there
    check_socket_paths(settings)  # circus's are longer
    problem = home_for_circus_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    pidfile = circusd_pidfile(settings)
    running = live_circusd(pidfile)
    if running and watchers_stopping(settings.circus_endpoint):
        # `circusctl quit` (without --waiting), then `make run`: it was refused as running, a second
        # before it would not have been. A stop or restart of the watchers is refused once it is done.
        print(f"tickstack in {settings.home} is stopping watchers (circusd pid {running}); waiting to see "
              f"whether it quits, at most {STOPPING_WAIT_S:.0f} s", flush=True)
        if wait_while_stopping(settings.circus_endpoint, running, STOPPING_WAIT_S):
            running = None
    if running:  # first: what else is wrong would matter only to a start that is not needed
        print(f"tickstack is already running in {settings.home} (circusd pid {running}); manage it with "
              f"`{circusctl_command(settings.circus_endpoint, 'status')}`, or stop it with "
              f"`{circusctl_command(settings.circus_endpoint, 'quit')}`", file=sys.stderr)
        return 1
    problem = foreign_commands()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    left = orphans(settings.home)
    if left:
        # circusd killed (kill -9, a crash), then `make run`: its processes stop by themselves, and were
        # refused as running, with `kill` advice, a second or two before they were gone.
        print(f"tickstack processes of a circusd that is gone are stopping (pids {', '.join(map(str, left))}); "
              f"waiting for them, at most {STOPPING_WAIT_S:.0f} s", flush=True)
        wait_for_orphans(settings.home, STOPPING_WAIT_S, left)
    check_home(settings)  # a file in the way is said here; the folders are made once nothing refuses
    stale = clear_stale_pidfile(pidfile)
    if stale is not None:
        said = "is not the circusd that wrote it" if psutil.pid_exists(stale) else "runs no more"
        print(f"removed the stale pid file {pidfile}: pid {stale} {said}")
    found = blockers(settings)
    if found:  # a refused start leaves no folders behind in a home it would have made
        print(refusal(settings, found), file=sys.stderr)
        return 1
    refused = owner_login_refused(settings)  # PostgreSQL: a refused login is said here, not after 3 retries
    if refused is not None:
        print(refused, file=sys.stderr)
        return 1
    # The writer refuses it at each start (circus's flapping then stops it) and the workers wait 60 s
    # for a database, then exit: said here, once, with what to do.
    refused = new_database_refusal(settings.database_path)
    if refused is not None:
        print(f"python -m db prepare: {refused}", file=sys.stderr)
        return 1
    home = ensure_home(settings)
    # circus opens its log before any hook of ours, under circusd's umask, and appends: made here
    # private, it stays so, even through a start circus itself refuses (a web port taken since).
    touch_private(settings.log_dir / "circusd.log")
    print(f"runtime folder {home} (mode 0700): database, sockets, logs, spool, backups")
    print(first_contact(settings))
    return 0


def first_contact(settings: Settings) -> str:
    """What to open and what to type once the stack is up: ``make run`` says it before circusd
    takes over the terminal (circusd itself prints nothing)."""
    from db.circusd import circusctl_command
    from db.engine import display_url

    if settings.admin_password:  # no file is made or read then: one left from an earlier start is not it
        password = "password: the value of TICKSTACK_ADMIN_PASSWORD"
    else:
        path = settings.home / PASSWORD_FILE
        password = f"password in {path}" + ("" if path.exists() else ", made on first start")
    health = f"http://127.0.0.1:{settings.api_port}/api/health"
    return (f"console    http://127.0.0.1:{settings.console_port}/ (user {settings.admin_user!r}, {password})\n"
            f"api        {health} (and /api/openapi.json)\n"
            f"database   {display_url(settings.database_url)}\n"
            f"ready      in a few seconds: {health} says \"ok\" once the stack is up (circusd logs to "
            f"{settings.log_dir / 'circusd.log'}, not here)\n"
            f"manage     `{circusctl_command(settings.circus_endpoint, 'status')}` (in the checkout)\n"
            f"stop       `{circusctl_command(settings.circus_endpoint, 'quit')}`, or Ctrl-C where `make run` "
            "(or a circusd started without --daemon) runs")


def cmd_settings(args: argparse.Namespace) -> int:
    from db.config import markdown_table

    print(markdown_table())
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from db.engine import display_url, make_write_engine
    from db.lock import WriterLock, WriterLocked, lock_holder_words
    from db.schema import migrate

    settings = load_settings()
    if settings.database_path is not None and not settings.database_path.exists():
        # A new SQLite file, in a home whose writer writes a server's database (a shell without its
        # DATABASE_URL): doctor's rule refuses it, as `db health` does.
        from db.served_database import served_database, wrong_database_refusal

        refused = wrong_database_refusal(settings, served_database(settings))
        if refused is not None:
            print(f"python -m db init: {refused}", file=sys.stderr)
            return 1
    ensure_home(settings)
    lock = WriterLock(settings.writer_lock_path)
    try:
        lock.acquire()
    except WriterLocked:  # its words are a second writer's refusal: not this command's case
        holder, command = lock_holder_words(settings.writer_lock_path)
        if command is not None:  # a restore replacing the database: nothing is known to be current
            print(f"python -m db init: `{command}` (pid {holder}) holds the writer lock {settings.writer_lock_path}: "
                  "run this again once it has ended", file=sys.stderr)
            return 1
        print(f"the writer{f' (pid {holder})' if holder is not None else ''} is running and keeps the schema "
              "current: nothing to do")
        return 0
    try:
        # Asked holding the lock, as the writer asks it: a restore killed mid-swap just before (its lock
        # free then) left no database, and a new, empty one would take the restored one's place.
        refused = new_database_refusal(settings.database_path)
        if refused is not None:  # or meet an old WAL
            print(f"python -m db init: {refused}", file=sys.stderr)
            return 1
        engine = make_write_engine(settings)
        with engine.begin() as conn:
            before, after = migrate(conn)
        engine.dispose()
    finally:
        lock.release()
    shown = display_url(settings.database_url)
    print(f"{shown}: schema version {before} -> {after}" if before != after
          else f"{shown}: schema already at version {after}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from db.health import snapshot
    from db.leader import NOBODY
    from db.served_database import wrong_database_refusal

    settings = load_settings()
    check_home(settings)  # a file as TICKSTACK_HOME: said in one line, not as the lock file's traceback
    snap = snapshot(settings, quick_check=args.quick_check)
    refused = wrong_database_refusal(settings, snap["writer"].get("database") if snap["writer"]["up"] else None)
    if refused is not None:  # doctor's rule: what follows would be about a database the stack does not use
        print(f"python -m db health: {refused}", file=sys.stderr)
        return 1
    w = snap["writer"]
    server = snap.get("server")  # PostgreSQL: db.server.server_status
    # Exit code: scripts and monitors see a writer that does not answer, or a server that does not.
    down = 0 if w["up"] and (server is None or server["reachable"]) else 1
    if args.json:
        json.dump(snap, sys.stdout, indent=2, default=str)
        print()
        return down
    print(f"database   {snap.get('path', snap['database_url'])}")
    if server is not None and server["reachable"]:
        print(f"server     up, PostgreSQL {server['version']}, ping {server['ping_ms']} ms, database "
              f"{_human_bytes(server['size_bytes'])}, {server['connections']} connections "
              f"({server['server_connections']} of {server['max_connections']} on the server)")
        for app, n in server["by_application"].items():
            print(f"connection {n:>4} {app}")
        if server["writer_lock"]["held"]:
            print(f"lock       host {server['writer_lock']['host']}'s writer lock held by "
                  f"{server['writer_lock']['text']}")
        for writer in server["writer_lock"].get("writers", []):
            print(f"writer     {writer}")
    elif server is not None:  # a server that answers, refusing the login or full, is not down
        trouble = server_trouble(str(server["error"]))
        print(f"server     {'DOWN' if trouble == 'does not answer' else 'up, but it ' + trouble} ({server['error']})")
    for name, leader in snap.get("leaders", {}).items():
        print(f"leader     {name}: {leader or 'nobody (' + NOBODY.get(name, 'no process of it runs') + ')'}")
    if "files" in snap:
        f = snap["files"]
        print(f"files      db {_human_bytes(f['db'])}, wal {_human_bytes(f['wal'])}, shm {_human_bytes(f['shm'])}")
    p = snap.get("pragmas", {})
    if "error" in p:
        print(f"pragmas    error: {p['error']}")
    elif p:
        print(f"pragmas    journal_mode {p['journal_mode']}, {p['page_count']} pages of {p['page_size']} B, "
              f"{p['freelist_count']} free")
        if "quick_check" in p:
            print(f"check      quick_check {'ok' if p['quick_check']['ok'] else p['quick_check']['messages']}")
    check = snap.get("integrity")  # a server's amcheck
    if check is not None:
        said = (f"skipped: {check['skipped']}" if "skipped" in check else "ok" if check["ok"] else
                "; ".join(map(str, check["messages"][:3])))
        print(f"check      amcheck {said}")
    if w["up"]:
        st = w["stats"]
        print(f"writer     pid {w['pid']}, ping {w['ping_ms']} ms, queue {st['queue_depth']}, batches "
              f"{st['batches']} (mean {st['mean_batch']}), commit p50 {st['commit_p50_ms']} ms p99 "
              f"{st['commit_p99_ms']} ms, ok {st['requests_ok']}, failed {st['requests_failed']}, "
              f"busy {st['busy_replies']}")
    else:
        print(f"writer     DOWN ({w.get('error', 'no answer')})")
    print(f"lock errs  {snap.get('lock_errors', 0)}")
    for d in snap.get("disk", []):
        if "error" in d:
            print(f"disk       {d['what']} {d['path']}: {d['error']}")
            continue
        state = {"ok": "", "warn": "  <-- LOW", "fail": "  <-- ALMOST FULL"}[d["level"]]
        flag = f"{state} (warning below {d['warn_pct']:g} %)" if state else ""
        print(f"disk       {d['what']}: {_human_bytes(d['free'])} free of {_human_bytes(d['total'])} "
              f"({d['free_pct']:.1f} %) at {d['path']}{flag}")
    for proc in snap.get("processes", []):
        flag = "  <-- " + proc["role"].upper() if proc["flagged"] else ""
        if proc.get("in_read_transaction") and proc["role"] != "writer":  # what holds the WAL back
            flag += "  (in a read transaction)"
        print(f"process    {proc['pid']:>7} {proc['role']:<12} {proc['cmdline'][:70]}{flag}")
    return down


def cmd_doctor(args: argparse.Namespace) -> int:
    from db.health import diagnose, snapshot

    settings = load_settings()
    check_home(settings)
    snap = snapshot(settings, quick_check=True)
    findings = diagnose(snap, settings)
    for level, text in findings:
        print(f"[{level.upper():4}] {text}")
    return 1 if any(level == "fail" for level, _ in findings) else 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from db.checkpoints import checkpoint_words, measured_checkpoint
    from db.circusd import writer_down_advice
    from db.client import WriterClient
    from db.errors import WriterUnavailable
    from db.lock import read_lock_holder

    settings = load_settings()
    check_home(settings)  # else a file as TICKSTACK_HOME waits out --timeout on a socket that cannot exist
    if settings.database_path is None:  # as the console and the jobs worker: the writer is not asked
        said = "nothing to do, a PostgreSQL server checkpoints itself"
        print(json.dumps({"skipped": said}) if args.json else f"checkpoint: {said}")
        return 0
    with WriterClient(settings=settings, deadline=args.timeout) as client:
        # No process holds this home's writer lock and none answers a ping: nothing will answer
        # within --timeout either. Said at once, as doctor says it. (Both: WRITER_ENDPOINT may name
        # a writer of another home, which answers.)
        if read_lock_holder(settings.writer_lock_path) is None:
            try:
                client.ping(timeout=min(args.timeout, 1.0))
            except WriterUnavailable:
                print(f"python -m db checkpoint: {writer_down_advice(settings)}", file=sys.stderr)
                return 1
        result = measured_checkpoint(client.call, settings.database_path, args.mode)
    print(json.dumps(result) if args.json else f"checkpoint {checkpoint_words(result)}")
    if result.get("busy"):
        print("partial: a reader held the checkpoint back; run it again when reads are quieter", file=sys.stderr)
        return 1
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from db.backups import backup, backup_path, backup_suffix

    settings = load_settings()
    check_home(settings)
    dest = Path(args.path)
    # Path() drops a trailing slash: `backup /tmp/new/` wrote a file named /tmp/new.
    if args.path.endswith(os.sep) and not dest.is_dir():
        example = backup_path(dest.absolute(), backup_suffix(settings))
        raise NotADirectoryError(f"{args.path} names a folder (it ends in {os.sep}), and there is none; give the "
                                 f"backup file's path (e.g. {example}) in a folder that exists")
    result = backup(settings, dest, overwrite=args.force)
    checked = f"{result['entries']} entries listed by pg_restore" if "entries" in result else "integrity ok"
    print(f"backup written: {result['path']} ({_human_bytes(result['bytes'])}, {result['ms']} ms, {checked})")
    return 0


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader closed it (poll says POLLERR on such a write end): a
    broken pipe of another kind is reported."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file number (a test's captured stdout), not Linux
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m db", description="Look after the tickstack database.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="create the runtime folder, check settings").set_defaults(fn=cmd_prepare)
    sub.add_parser("init", help="create the runtime folder and the schema").set_defaults(fn=cmd_init)
    p = sub.add_parser("health", help="a snapshot of the database's health")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quick-check", action="store_true",
                   help="also run PRAGMA quick_check (reads every page), or amcheck on PostgreSQL")
    p.set_defaults(fn=cmd_health)
    sub.add_parser("doctor", help="diagnose in plain words, with what to do").set_defaults(fn=cmd_doctor)
    p = sub.add_parser("checkpoint", help="ask the writer to checkpoint the WAL")
    p.add_argument("--mode", default="TRUNCATE", type=str.upper, choices=["PASSIVE", "FULL", "RESTART", "TRUNCATE"])
    p.add_argument("--json", action="store_true",
                   help="print the writer's answer as JSON (busy, log, checkpointed; mode; the WAL's size before "
                        "and after: wal_before, wal_after; on PostgreSQL, skipped: why)")
    # Finite and > 0: with nan the wait for the writer never ended (now >= nan is never true); at most a
    # day, as TICKSTACK_CLIENT_DEADLINE.
    p.add_argument("--timeout", type=number_flag(0, MAX_CLIENT_DEADLINE_S, above=True), default=30.0,
                   help=f"seconds to wait for the writer (default 30, at most {MAX_CLIENT_DEADLINE_S:.0f})")
    p.set_defaults(fn=cmd_checkpoint)
    p = sub.add_parser("backup", help="consistent online copy of the database")
    p.add_argument("path", type=path_flag, help="where to write the copy")
    p.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    p.set_defaults(fn=cmd_backup)
    p = sub.add_parser("restore", help="put a backup in the database's place (the stack stopped): an SQLite .db, "
                                       "or on PostgreSQL a .dump")
    p.add_argument("backup", type=path_flag, help="the backup file (e.g. var/backups/tickstack-20260101T000000Z.db, "
                                                  "or .dump on PostgreSQL)")
    p.add_argument("--no-copy", action="store_true",
                   help="PostgreSQL: do not dump the database before it is replaced (when pg_dump cannot read it)")
    p.set_defaults(fn=cmd_restore)
    sub.add_parser("settings", help="print the table of settings (Markdown)").set_defaults(fn=cmd_settings)
    args = parser.parse_args(argv)
    os.umask(0o077)  # what a command makes (the database and its folder, a backup's folders) is private
    try:
        code = args.fn(args)
        if sys.stdout is not None:  # None: started with stdout closed (>&-)
            sys.stdout.flush()  # here, not at exit: what is still buffered meets a closed pipe inside this try
        return code
    except BrokenPipeError as e:
        if not _stdout_reader_gone():
            print(f"python -m db {args.command}: {e}", file=sys.stderr)
            return 1
        # Its reader stopped reading (`| head`): not an error to report. Python flushes stdout again
        # at exit, into the same closed pipe: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ConfigError, WriterError, OSError, ValueError, RuntimeError) as e:  # OSError: a path's (no room, no right)
        print(f"python -m db {args.command}: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from sqlalchemy.exc import DBAPIError  # here: the commands that never open a database stay light

        if not isinstance(e, DBAPIError):
            raise
        # The database's own reason (a folder, not SQLite's file, no right to it), without the SQL; for a
        # file that is not SQLite's, what it begins with (SQLite says only "file is not a database").
        from db.files import not_sqlite_reason

        try:
            path = load_settings().database_path
        except ConfigError:
            path = None
        reason = not_sqlite_reason(path) or e.orig
        print(f"python -m db {args.command}: cannot use the database: {reason}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
