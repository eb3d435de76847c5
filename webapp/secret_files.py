"""The secret files of a home (``api-token``, ``secret-key``, ``admin-password``), read or generated on
first use by :func:`db.config.read_or_create_secret`: a file that cannot be used is said in words,
never raised.

An exception there used to stop the app that needed the file: gunicorn's workers failed to boot,
gunicorn exited and circus respawned it until its flapping plugin gave up, the reason only in a
traceback (a FIFO in the file's place even blocked the start for ever). Each app now starts without
the secret, refuses only what needs it, and says which file is wrong, what is wrong with it and how
to fix it (:func:`unusable`): the API's writes (:mod:`webapp.api.tokens`), the console's pages
(:mod:`webapp.auth`). The file itself is left as it is: a secret is never written over.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from db.config import ConfigError, read_or_create_secret


@dataclass(frozen=True)
class SecretFile:
    """A secret file as read: its value, whether this read generated it, or what is wrong with it."""

    path: Path
    value: str  # "" when the file is unusable
    created: bool = False
    #: What is wrong with the file, as the end of a sentence naming it ("is empty", "cannot be read
    #: (it is a folder, not a regular file)"); None when :attr:`value` is good.
    wrong: str | None = None


def read_secret_file(path: Path, generate: Callable[[], str]) -> SecretFile:
    """The secret in ``path``, generated with ``generate()`` on first use (mode 0600), or what is
    wrong with the file; never an exception for the file's sake."""
    try:
        value, created = read_or_create_secret(path, generate)
    except ConfigError:  # blank, even after a worker creating it had its time to write it
        wrong = "is empty"
    except UnicodeError:
        wrong = "cannot be read (it is not UTF-8 text)"
    except OSError as e:  # no permission, a folder, a FIFO, ...
        wrong = f"cannot be read ({e.strerror or type(e).__name__})"
    else:
        return SecretFile(path, value, created)
    return SecretFile(path, "", wrong=wrong)


def unusable(what: str, path: Path, wrong: str, refused: str, fix: str, restart: str) -> str:
    """The one sentence of the log and of every refusal while a secret file is unusable: ``what``
    file (``path``) ``wrong``, what is ``refused`` meanwhile, and how to ``fix`` it, then the
    ``restart`` command that makes the app read it again."""
    return f"The {what} {path} {wrong}: {refused} until it is fixed. {fix}; then run `{restart}`."
