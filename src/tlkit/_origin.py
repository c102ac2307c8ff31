"""Whose run folder is this? A run's ``config.yaml`` is signed with a key only this user account holds.

A run folder is data that may come from anyone (downloaded, unpacked, shared). Its
``config.yaml`` names folders on the machine that trained it (``data.root``); commands that
would read those folders (``evaluate --split val``, the INT8 export's default calibration)
follow them only for a run this user account trained: when tlkit writes ``config.yaml`` it also
writes ``.tlkit-origin``, the HMAC-SHA256 of the file's bytes under a random key kept in
``~/.config/tlkit/run-origin.key`` (``$XDG_CONFIG_HOME``, or ``$TLKIT_HOME`` if set; mode 0600).
A stranger cannot make that signature without the key, and an edit of ``config.yaml`` (a new
``data.root``) breaks it. A run copied or moved on this account stays its own.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from tlkit._fs import atomic_write_bytes

__all__ = ["ORIGIN_NAME", "is_own_run", "sign_run_config"]

ORIGIN_NAME = ".tlkit-origin"
_KEY_BYTES = 32
_MAX_CONFIG_BYTES = 4 * 2**20


def _key_file() -> Path:
    home = os.environ.get("TLKIT_HOME")
    if home:
        return Path(home) / "run-origin.key"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "tlkit" / "run-origin.key"


def _key(create: bool) -> bytes | None:
    """This account's key (made on first use when ``create``); ``None`` if there is none or it is unreadable."""
    path = _key_file()
    try:
        with open(path, "rb") as f:
            key = f.read(_KEY_BYTES + 1)
        return key if len(key) == _KEY_BYTES else None
    except FileNotFoundError:
        if not create:
            return None
    except OSError:
        return None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:  # O_EXCL: two first runs at once keep one key; O_NOFOLLOW: never through a planted link
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _key(create=False)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(_KEY_BYTES))
    return _key(create=False)


def _digest(key: bytes, config: Path) -> str | None:
    try:
        with open(config, "rb") as f:
            data = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError:
        return None
    if len(data) > _MAX_CONFIG_BYTES:
        return None
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def sign_run_config(run_dir: str | Path) -> None:
    """Write ``RUN/.tlkit-origin`` for the ``config.yaml`` this account just wrote there.

    Best effort: a home folder that cannot hold the key leaves the run unsigned (it is then
    treated as a stranger's: its recorded data root is not followed).
    """
    key = _key(create=True)
    digest = _digest(key, Path(run_dir) / "config.yaml") if key is not None else None
    if digest is not None:
        atomic_write_bytes(Path(run_dir) / ORIGIN_NAME, digest.encode())


def is_own_run(run_dir: str | Path) -> bool:
    """Whether ``RUN/config.yaml`` was written by tlkit under this user account, unchanged since."""
    key = _key(create=False)
    origin = Path(run_dir) / ORIGIN_NAME
    if key is None or origin.is_symlink() or not origin.is_file() or origin.stat().st_size > 128:
        return False
    digest = _digest(key, Path(run_dir) / "config.yaml")
    return digest is not None and hmac.compare_digest(digest, origin.read_text(errors="replace").strip())
