"""Secrets several hosts share (issue 11): the console's password and the web apps' secret key from
the environment, so every host's console accepts the same password, and nothing is written to a
file or shown where a setting would be (``TICKSTACK_ADMIN_PASSWORD``, ``TICKSTACK_SECRET_KEY``)."""
from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator

import pytest

from db.config import ConfigError, load_settings
from testkit.env import isolated_env, new_home
from tests.test_console import Console
from webapp import create_app

PASSWORD = "correct horse battery staple"
SECRET_KEY = "k" * 16 + "e" * 16 + "y" * 16


@pytest.fixture
def two_homes() -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """Two hosts' environments (separate homes) with the same shared secrets."""
    homes = [new_home(), new_home()]
    try:
        yield tuple({**isolated_env(h), "TICKSTACK_ADMIN_PASSWORD": PASSWORD,  # type: ignore[misc]
                     "TICKSTACK_SECRET_KEY": SECRET_KEY} for h in homes)
    finally:
        for h in homes:
            shutil.rmtree(h, ignore_errors=True)


def test_every_hosts_console_accepts_the_shared_password_and_writes_no_password_file(
        two_homes: tuple[dict[str, str], dict[str, str]], caplog: pytest.LogCaptureFixture) -> None:
    for env in two_homes:
        settings = load_settings(env)
        assert PASSWORD not in repr(settings) and SECRET_KEY not in repr(settings)
        with caplog.at_level(logging.INFO):
            c = Console(create_app("console", settings))
        c.app.config["CONSOLE_AUDIT_DEADLINE"] = 0.2  # no writer here: audit records are spooled
        assert c.app.config["SECRET_KEY"] == SECRET_KEY
        assert not (settings.home / "admin-password").exists() and not (settings.home / "secret-key").exists()
        refused = c.login("admin", "not the password")
        assert refused.status_code == 200 and "Wrong user name or password." in refused.text
        assert c.get("/console/login").status_code == 200  # not logged in: the form
        assert c.login("admin", PASSWORD).status_code == 302
        assert c.get("/console/login").status_code == 302  # logged in: on to the console
    assert PASSWORD not in caplog.text and SECRET_KEY not in caplog.text


def test_a_weak_shared_secret_is_refused_at_start_naming_the_variable(
        two_homes: tuple[dict[str, str], dict[str, str]]) -> None:
    env = two_homes[0]
    with pytest.raises(ConfigError, match=r"TICKSTACK_ADMIN_PASSWORD must be at least 12 characters \(it has 6\)"):
        load_settings({**env, "TICKSTACK_ADMIN_PASSWORD": "secret"})
    with pytest.raises(ConfigError, match="TICKSTACK_SECRET_KEY must be at least 32 characters"):
        load_settings({**env, "TICKSTACK_SECRET_KEY": "short"})
    # Blank is unset: each home generates its own, as before.
    settings = load_settings({**env, "TICKSTACK_ADMIN_PASSWORD": " ", "TICKSTACK_SECRET_KEY": ""})
    create_app("console", settings)
    assert (settings.home / "admin-password").stat().st_mode & 0o777 == 0o600
    assert (settings.home / "secret-key").stat().st_mode & 0o777 == 0o600
