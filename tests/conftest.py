"""Fixtures that start real processes in a private runtime folder.

Fixtures only: what they are built from (the isolated environment, the
writer, circusd, helpers) lives in :mod:`testkit`, and tests import it from
there. Every test gets its own short ``TICKSTACK_HOME`` (Unix socket paths
are limited to 107 bytes, so not pytest's deep tmp_path) and stops what it
started by pid.

``--database postgresql`` runs the suite on a throwaway PostgreSQL server (one for the session,
:class:`testkit.postgres.PostgresServer`), every private home with a database of its own on it.
Without PostgreSQL's binaries that run is skipped with a message, except in CI (``CI`` set),
where that is a failure. ``make test`` runs the suite twice, once per database; tests marked
``sqlite_only`` or ``postgres_only`` run in their database's run only, and tests marked
``database_independent`` (their promise is the same whatever the database) in the SQLite run only.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The checkout on sys.path, so ``testkit`` imports however pytest was started.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testkit.circus import Circusd  # noqa: E402
from testkit.env import use_database  # noqa: E402
from testkit.postgres import HomeDatabases, PostgresServer, PostgresUnavailable  # noqa: E402
from testkit.writer import RawPeer, Stack  # noqa: E402

#: SIGTERM and Ctrl-C stop a run, every process a test started included (:mod:`testkit.interrupts`).
pytest_plugins = ["testkit.interrupts"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--database", choices=("sqlite", "postgresql"), default="sqlite",
                     help="the database every private stack runs on: sqlite (a file in its home, the default) "
                          "or postgresql (a database of its own on a throwaway server)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--database") == "postgresql":  # before the tests are imported: their output folders
        import testkit.browser

        testkit.browser.OUTPUT_ROOT = ROOT / "test-output" / "postgresql"
    config.addinivalue_line("markers", "sqlite_only(counterpart): runs with --database sqlite only: a test of "
                                       "something only SQLite has (its file, WAL, PRAGMAs), or a parameter set of a "
                                       "check whose other sets run on both databases (the stylesheet's, at each "
                                       "width and scheme: testkit.browser.widths_and_schemes). ``counterpart`` names "
                                       "the test (path::name) that checks the same promise on PostgreSQL")
    config.addinivalue_line("markers", "postgres_only: a test of something only a server has (roles, advisory "
                                       "locks, several hosts, pg_dump); runs with --database postgresql only")
    config.addinivalue_line("markers", "database_independent(reason): a test whose promise is the same whatever the "
                                       "database (circus's handling of processes, gunicorn, the console's login and "
                                       "watcher pages, flags and files refused before a database is opened, the "
                                       "code's own layout); ``reason`` says why. Runs with --database sqlite only: "
                                       "the PostgreSQL run is for what the database changes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """One run per database: ``--database sqlite`` leaves out the ``postgres_only`` tests,
    ``--database postgresql`` the ``sqlite_only`` ones (each names its PostgreSQL counterpart, and
    ``tests/test_layout.py`` checks that it runs there) and the ``database_independent`` ones (each
    says why; the same check). Both runs together are the whole suite: ``make test`` runs both."""
    nowhere = [item.nodeid for item in items
               if item.get_closest_marker("postgres_only") and item.get_closest_marker("database_independent")]
    if nowhere:  # each run would leave them out: tests that run in neither
        raise pytest.UsageError(f"postgres_only and database_independent on the same test leave it out of both runs: "
                                f"{nowhere[:5]}")
    others = ("postgres_only",) if config.getoption("--database") == "sqlite" else ("sqlite_only",
                                                                                     "database_independent")
    left_out = [item for item in items if any(item.get_closest_marker(other) for other in others)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not any(item.get_closest_marker(other) for other in others)]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session (started on first use, stopped at the end).
    Skipped with the reason when it cannot start; in CI (``CI`` set) that fails instead."""
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL for these tests: {e}")
        pytest.skip(f"PostgreSQL tests skipped: {e}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def home_databases(postgres_server: PostgresServer) -> HomeDatabases:
    """Makes a database on the session's server for a private home (:class:`HomeDatabases`), with
    amcheck, so every integrity check of the PostgreSQL run is a real one."""
    return HomeDatabases(postgres_server, amcheck=True)


@pytest.fixture(scope="session", autouse=True)
def database_under_test(request: pytest.FixtureRequest) -> Iterator[str]:
    """``--database``: with postgresql, every home the harness makes (:func:`testkit.env.isolated_env`)
    gets its own database on the session's server for the whole run."""
    name = request.config.getoption("--database")
    if name == "postgresql":
        use_database(request.getfixturevalue("home_databases"))
    try:
        yield name
    finally:
        use_database(None)


@pytest.fixture
def stack() -> Iterator[Stack]:
    """A fresh runtime folder; whatever the test started in it is killed after."""
    st = Stack.create()
    try:
        yield st
    finally:
        st.close()


@pytest.fixture
def writer(stack: Stack) -> Iterator[Stack]:
    """A running writer in a fresh runtime folder."""
    stack.start_writer()
    yield stack


@pytest.fixture
def peer_class() -> type[RawPeer]:
    """The class :func:`peer` makes: a module whose peer builds its own frames overrides this."""
    return RawPeer


@pytest.fixture
def peer(writer: Stack, peer_class: type[RawPeer]) -> Iterator[RawPeer]:
    """A raw protocol peer of the running writer (:class:`testkit.writer.RawPeer`, or the module's
    :func:`peer_class`), closed after."""
    p = peer_class(writer.settings.writer_endpoint)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def circusd(writer: Stack) -> Iterator[Stack]:
    """A minimal circusd on the stack's own endpoint, with one running and
    one stopped watcher; stopped (and only what it started, by pid) after."""
    run = writer.home / "run"
    ini = writer.home / "circus-test.ini"
    ini.write_text(f"""[circus]
endpoint = ipc://{run}/circus.sock
pubsub_endpoint = ipc://{run}/circus-pubsub.sock
stats_endpoint = ipc://{run}/circus-stats.sock
statsd = False

[watcher:sleeper]
cmd = sleep 600

[watcher:idle]
cmd = sleep 600
autostart = False
""")
    daemon = Circusd(writer.env, ini, cwd=writer.home, log_path=writer.home / "log" / "circusd-test.log",
                     call_timeout=5)
    try:
        daemon.start(wait_active=("sleeper",), timeout=30, poll=0.2)
        yield writer
    finally:
        daemon.stop(quit_timeout=30, term_timeout=10)
