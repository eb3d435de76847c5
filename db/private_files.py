"""Which of a home's private things other users may read: its secret files and the home itself.

Everything tickstack makes is private (files 0600, folders 0700), but a secret file copied in by hand
or made under another tool's umask keeps the mode it was given, and the console uses it all the same
(refusing it would lock the operator out). ``db doctor`` says so with the command that fixes it, and
the console's log warns of its password file (:func:`open_mode`, one rule for both).
"""
from __future__ import annotations

import shlex
from pathlib import Path

from db.config import PASSWORD_FILE, SECRET_KEY_FILE, TOKEN_FILE, Settings

#: What each secret file of a home holds, as doctor names it.
SECRET_WHAT = {PASSWORD_FILE: "The console's password file", SECRET_KEY_FILE: "The console's session key file",
               TOKEN_FILE: "The API's token file"}


def open_mode(path: Path) -> int | None:
    """``path``'s permission bits when its group or other users have any of them, else None (a
    missing or unreadable path too: what is wrong with it is said where it is used)."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    return mode if mode & 0o077 else None


def private_file_findings(settings: Settings) -> list[tuple[str, str]]:
    """Doctor's warnings: each secret file of the home, and the home, that others may read or enter."""
    out: list[tuple[str, str]] = []
    for name, what in SECRET_WHAT.items():
        path = settings.home / name
        mode = open_mode(path)
        if mode is not None:  # read, or written over: a password of theirs
            # Quoted for the shell, as every command the stack prints: a home with a space in its path.
            out.append(("warn", f"{what} {path} is open to other users (mode {mode:03o}): "
                                f"`{shlex.join(('chmod', '600', str(path)))}`."))
    mode = open_mode(settings.home)
    if mode is not None:
        out.append(("warn", f"The home {settings.home} is open to other users (mode {mode:03o}): a file in it "
                            f"that is not private (copied in, or rotated by hand) is theirs to read. "
                            f"`{shlex.join(('chmod', '700', str(settings.home)))}`."))
    return out
