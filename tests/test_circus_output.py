"""What a process writes as it stops reaches its log (``supervision.streams.drain_before_removal``).

circus (0.19) stops reading a process's pipes the moment it sees the process gone and closes them,
so output written just before the exit was lost about one stop in ten: the ticks worker's summary
line (``source ... received N, acked N``) missing from its log after ``circusctl quit`` was one
such loss, seen as a failure of ``test_stack.py::test_stack_end_to_end`` under load.

The moment is a race (the loss was seen in 0 to 7 stops of 40 of a process that writes a line as
SIGTERM ends it), so the first test makes it happen every time, with circus's own process and
redirector: the process has written and exited, and circus removes its pipes before its loop read
them, as its ``Watcher.kill_process`` does. The second runs a real circusd with one watcher of the
stream class circus.ini gives every watcher (``supervision.streams.PrivateFileStream``, whose
module installs the drain), stopped and started again and again: a tiny watcher of its own, as the
stack's workers take a second each to start."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from testkit.env import ROOT
from testkit.helpers import wait_for
from testkit.process import stop_process

#: Stops of the end-to-end check (each about 0.35 s); the loss was seen in 0 to 7 stops of 40.
STOPS = 20

#: Each line in one os.write: a SIGTERM that came while sys.stderr's flush of "started" held its
#: lock (the test stops the child as soon as that line is in the log) made the handler's own write
#: fail, "reentrant call inside <_io.BufferedWriter name='<stderr>'>", and the last words were lost.
CHILD = """
import os, signal, time
def bye(*_):
    os.write(2, b"last words " + b"x" * 200 + b" END\\n")
    os._exit(0)  # at once: the line is in the pipe, unread, as the process goes
signal.signal(signal.SIGTERM, bye)
os.write(2, b"started\\n")
while True:
    time.sleep(1)
"""


@pytest.mark.database_independent("circus's removal of a stopped process's output pipes, with no database")
def test_what_a_process_wrote_before_circus_removes_its_pipes_reaches_its_stream(tmp_path: Path) -> None:
    from circus.process import Process
    from circus.stream.redirector import Redirector

    from supervision.streams import PrivateFileStream

    logs = {name: tmp_path / f"{name}.log" for name in ("stdout", "stderr")}
    streams = {name: PrivateFileStream(filename=str(path)) for name, path in logs.items()}
    redirector = Redirector(streams["stdout"], streams["stderr"])  # its loop never runs: nothing read
    script = "import sys; print('last out ' + 'o' * 3000); sys.stderr.write('last err ' + 'e' * 60000)"
    process = Process("child", 1, sys.executable, args=["-c", script], working_dir=str(ROOT))
    try:
        redirector.add_redirections(process)
        stderr = process.stderr
        wait_for("the child to have written and exited", lambda: process.poll() is not None, timeout=60)
        redirector.remove_redirections(process)
        assert not process.redirected
    finally:
        process.stop()  # closes its pipes, as circus does after the removal
        for stream in streams.values():
            stream.close()
    assert stderr.closed
    assert logs["stdout"].read_text().endswith("last out " + "o" * 3000 + "\n")
    assert logs["stderr"].read_text().endswith("last err " + "e" * 60000)


@pytest.mark.database_independent("circus's reaping of a process that ended by itself, with no database")
def test_what_a_process_wrote_before_it_ended_by_itself_reaches_its_stream_when_circus_reaps_it(
        tmp_path: Path) -> None:
    """A process that ends by itself (a crash, its traceback on stderr) is reaped by circus's periodic
    check (``Arbiter.reap_processes``, every ``check_delay``: ``Watcher.reap_process``), which closes
    its pipes (``Process.stop``) without removing them from its loop: the drain at the removal never
    saw them, and what the loop had not read yet was lost. Its loop reads 1 KiB a turn, so a reap in
    the same turn as the exit kept the first 1 KiB of a longer output (seen: 1 exit in 245 of a real
    circusd at check_delay 0.1 s). Here, with circus's own Watcher, the output is all unread."""
    from circus.watcher import Watcher

    import supervision.streams  # noqa: F401  (circusd imports it: circus.ini names its stream class)

    log = tmp_path / "crasher.log"
    script = "import sys; sys.stderr.write('Traceback ' + 'e' * 60000 + ' END'); sys.exit(1)"
    watcher = Watcher("crasher", sys.executable, args=["-c", script], working_dir=str(ROOT), respawn=False,
                      stderr_stream={"class": "supervision.streams.PrivateFileStream", "filename": str(log)})
    watcher._status = "active"  # as its start sets it (a stopped watcher spawns nothing)
    watcher._create_redirectors()  # its loop never runs: nothing is read but by the reap
    try:
        assert watcher.spawn_process()
        ((pid, _),) = watcher.processes.items()
        wait_for("the child to have written and exited", lambda: os.waitid(
            os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None, timeout=60)
        watcher.reap_process(pid, os.waitpid(pid, 0)[1])  # as Arbiter.reap_processes does
        assert pid not in watcher.processes
    finally:
        for process in watcher.processes.values():
            process.stop()
        watcher.stderr_stream.close()
    assert log.read_text().endswith("Traceback " + "e" * 60000 + " END")


@pytest.mark.database_independent("circusd's handling of a stopped process's output pipes, with no database")
def test_what_a_process_writes_as_it_is_stopped_reaches_its_log() -> None:
    folder = Path(tempfile.mkdtemp(prefix="ts-out-"))  # 0700: the endpoints' folder, as the stack's
    try:
        (folder / "child.py").write_text(CHILD)
        log = folder / "child.log"
        endpoint = f"ipc://{folder}/circus.sock"
        (folder / "circus.ini").write_text(f"""[circus]
endpoint = {endpoint}
pubsub_endpoint = ipc://{folder}/pubsub.sock
check_delay = 1

[watcher:child]
cmd = {sys.executable} {folder / "child.py"}
graceful_timeout = 10
stderr_stream.class = supervision.streams.PrivateFileStream
stderr_stream.filename = {log}
""")
        circusd = subprocess.Popen([str(Path(sys.executable).parent / "circusd"), str(folder / "circus.ini")],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            from circus.client import CircusClient

            client = CircusClient(endpoint=endpoint, timeout=30)

            def said(words: str) -> int:
                return log.read_text().count(words) if log.exists() else 0

            def call(command: str) -> None:
                answer = client.call({"command": command, "properties": {"name": "child", "waiting": True}})
                assert answer.get("status") == "ok", answer

            wait_for("circusd to answer", lambda: client.call({"command": "list", "properties": {}}).get("status")
                     == "ok", timeout=60)
            for stop in range(STOPS):
                if stop:
                    call("start")
                wait_for("the child to have started", lambda stop=stop: said("started") > stop, timeout=60)
                call("stop")
            assert (said("started"), said(" END\n")) == (STOPS, STOPS), log.read_text()[-3000:]
            client.stop()
        finally:
            stop_process(circusd, 60)
    finally:
        shutil.rmtree(folder)
