"""Writing files in folders someone else may have prepared: atomic, and never through a symbolic link.

A run folder can come from anyone (downloaded, unpacked from an archive). A planted link named
``config.yaml`` or ``.tlkit.lock`` pointing at ``~/notes.txt`` must not turn ``notes.txt`` into
tlkit's file. Every file tlkit creates or replaces goes through here: a destination that is a
link is refused with its name, temporary files are created with ``O_EXCL | O_NOFOLLOW`` (a link
planted under a temporary name is never followed either), and the final ``os.replace`` swaps
directory entries without following anything. A leaf module: standard library only.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

__all__ = ["SymlinkRefused", "atomic_write_bytes", "check_not_symlink", "open_no_follow", "replace_folder", "temp_sibling"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class SymlinkRefused(OSError):
    """A file tlkit would write is a symbolic link (an ``OSError`` with ``errno.ELOOP`` and the path)."""

    def __init__(self, path: Path) -> None:
        try:
            target = f" (to {os.readlink(path)})"
        except OSError:
            target = ""
        super().__init__(errno.ELOOP, f"is a symbolic link{target}; tlkit never writes through a link in a "
                                      "folder it writes to: remove the link", str(path))

    def __str__(self) -> str:  # one line that starts with the path, as every tlkit file error does
        return f"{self.filename} {self.strerror}"


def check_not_symlink(path: str | Path) -> None:
    """Raise `SymlinkRefused` if ``path`` is a symbolic link (dangling or not)."""
    if os.path.islink(path):
        raise SymlinkRefused(Path(path))


def open_no_follow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` with ``O_NOFOLLOW``: a link at ``path`` is `SymlinkRefused`, never followed.

    Raises:
        SymlinkRefused: ``path`` is a symbolic link.
        OSError: as ``os.open``.
    """
    try:
        return os.open(path, flags | _NOFOLLOW | getattr(os, "O_BINARY", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):
            raise SymlinkRefused(Path(path)) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a new temporary file in the same folder, fsync, rename.

    A crash leaves either the old file or the new one, never a half-written file. The file gets
    the usual mode (0666 less the umask). A ``path`` that is a symbolic link is refused, and the
    temporary file is created exclusively (``O_EXCL | O_NOFOLLOW``) under an unpredictable name.

    Raises:
        SymlinkRefused: ``path`` is a symbolic link (nothing is written).
        OSError: the write failed (full disk, no permission, ...); its ``filename`` is ``path``
            (a failed rename keeps both names).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_not_symlink(path)
    tmp, fd = None, -1
    try:
        for _ in range(100):
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                fd = open_no_follow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
                break
            except FileExistsError:
                continue
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        # Name the file the caller asked for: write and fsync errors name none, open errors the
        # hidden temporary file (rename errors name both, and stay as they are).
        if e.errno is not None and e.filename2 is None and not isinstance(e, SymlinkRefused):
            e.filename = str(path)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None and os.path.lexists(tmp) and not os.path.islink(tmp):
            os.unlink(tmp)
    return path


def temp_sibling(path: str | Path, suffix: str = "") -> Path:
    """A name beside ``path`` that nothing holds yet (not even a link), hard to guess: for a
    temporary file a library writes by name (``torch.onnx.export``, ``torch.jit.save``) before
    `os.replace` moves it into place. ``suffix`` keeps the extension a writer insists on."""
    path = Path(path)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}{suffix}")
        if not os.path.lexists(tmp):
            return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def replace_folder(new: str | Path, path: str | Path) -> Path:
    """Put the finished folder ``new`` at ``path`` as one unit; an old folder there is removed after.

    The old folder is first renamed aside, then ``new`` renamed into place: a crash in between
    leaves ``path`` missing (the old and new folders both kept under hidden names), never a
    folder mixing the old files and the new ones.

    Raises:
        SymlinkRefused: ``path`` is a symbolic link.
    """
    import shutil

    new, path = Path(new), Path(path)
    check_not_symlink(path)
    old = temp_sibling(path, ".old") if path.exists() else None
    if old is not None:
        os.replace(path, old)
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path
