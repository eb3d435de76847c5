"""The settings registry: every variable declared once, one parser, the README's table made from it,
and a bad value stopping each process at start with a message naming the variable."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from db.config import SETTINGS, ConfigError, JobSchedule, Settings, load_settings, markdown_table

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = ("db", "supervision", "workers", "webapp")
NAME_RE = re.compile(r"\b(TICKSTACK_[A-Z0-9_]*[A-Z0-9]|DATABASE_URL|WRITER_ENDPOINT)\b")


def production_files() -> list[Path]:
    files = [p for package in PRODUCTION for p in (ROOT / package).rglob("*.py")]
    return [*files, ROOT / "circus.ini", ROOT / "Makefile"]


def test_registry_fills_every_settings_field_once() -> None:
    attrs = [s.attr for s in SETTINGS]
    envs = [s.env for s in SETTINGS]
    assert len(set(attrs)) == len(attrs) and len(set(envs)) == len(envs)
    assert attrs == [f.name for f in fields(Settings)]
    assert all(s.help and s.shown_default for s in SETTINGS)


def test_every_variable_the_code_names_is_declared() -> None:
    declared = {s.env for s in SETTINGS}
    named = {(m.group(1), path.relative_to(ROOT).as_posix())
             for path in production_files() for m in NAME_RE.finditer(path.read_text())}
    assert named, "the scan found no variable at all: the pattern is wrong"
    assert sorted(n for n in named if n[0] not in declared) == []


def test_only_the_registry_reads_the_environment() -> None:
    readers = re.compile(r"os\.environ\b(?!\.copy)|os\.getenv\(|environ\.get\(")
    found = sorted(p.relative_to(ROOT).as_posix() for p in production_files()
                   if p.suffix == ".py" and readers.search(p.read_text()))
    assert found == ["db/config.py"]


def test_readme_table_is_made_from_the_registry() -> None:
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- settings:begin -->\n", "\n<!-- settings:end -->"
    assert begin in readme and end in readme
    assert readme[readme.index(begin) + len(begin):readme.index(end)] == markdown_table()
    printed = subprocess.run([sys.executable, "-m", "db", "settings"], capture_output=True, text=True, cwd=ROOT,
                             timeout=60)
    assert printed.returncode == 0 and printed.stdout.strip() == markdown_table()


def test_defaults_and_blank_values() -> None:
    s = load_settings({"TICKSTACK_HOME": "/tmp/ts-config-test", "TICKSTACK_API_PORT": " "})
    assert s.database_url == "sqlite:////tmp/ts-config-test/tickstack.db"
    assert s.writer_endpoint == "ipc:///tmp/ts-config-test/run/writer.sock"
    assert (s.api_port, s.console_port, s.ready_timeout, s.admin_user, s.api_token) == (8000, 8001, 30.0, "admin", "")
    assert s.jobs == JobSchedule() == JobSchedule.from_env({})
    assert "secret-token-value" not in repr(load_settings({"TICKSTACK_API_TOKEN": "secret-token-value"}))


@pytest.mark.parametrize("name, value, message", [
    ("TICKSTACK_READY_TIMEOUT", "soon", "is not a number"),
    ("TICKSTACK_READY_TIMEOUT", "0", "at least 0.1"),
    ("TICKSTACK_API_PORT", "70000", "from 1 to 65535"),
    ("TICKSTACK_CONSOLE_PORT", "http", "is not a whole number"),
    ("TICKSTACK_SYNCHRONOUS", "OFF", "must be NORMAL or FULL"),
    ("TICKSTACK_WRITER_MAX_BATCH", "0", "at least 1"),
    ("TICKSTACK_CLIENT_DEADLINE", "inf", "at least 0.1"),
    ("TICKSTACK_ADMIN_USER", "no spaces", "is not a user name"),
    ("DATABASE_URL", "tickstack.db", "not a database URL"),
    ("WRITER_ENDPOINT", "tcp://0.0.0.0:5555", "loopback"),
])
def test_a_bad_value_names_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}.*{message}"):
        load_settings({name: value})


@pytest.mark.parametrize("module", ["workers.writer", "workers.ticks", "workers.analysis", "workers.monitor",
                                    "workers.jobs"])
def test_every_process_refuses_a_bad_setting_at_start(module: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKSTACK_") and k not in
           ("DATABASE_URL", "WRITER_ENDPOINT")}
    env.update(TICKSTACK_HOME=str(tmp_path), TICKSTACK_READY_TIMEOUT="soon")
    proc = subprocess.run([sys.executable, "-m", module, "--until-idle"] if module != "workers.writer"
                          else [sys.executable, "-m", module], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "TICKSTACK_READY_TIMEOUT='soon' is not a number" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_direct_writes_are_refused_on_sqlite_naming_the_variable() -> None:
    """Only the writer may write SQLite: TICKSTACK_DIRECT_WRITES there stops every process at start."""
    with pytest.raises(ConfigError, match="TICKSTACK_DIRECT_WRITES works on PostgreSQL only"):
        load_settings({"TICKSTACK_HOME": "/tmp/ts-config-test", "TICKSTACK_DIRECT_WRITES": "1"})
    with pytest.raises(ConfigError, match="TICKSTACK_DIRECT_WRITES='maybe' must be 1 or 0"):
        load_settings({"TICKSTACK_HOME": "/tmp/ts-config-test", "TICKSTACK_DIRECT_WRITES": "maybe"})
    off = load_settings({"TICKSTACK_HOME": "/tmp/ts-config-test", "TICKSTACK_DIRECT_WRITES": "0"})
    assert off.direct_writes is False
