"""One run per folder: an OS file lock on ``OUTPUT_DIR/.tlkit.lock``, held for the whole run.

Two runs writing one run folder would mix their files silently (one run's ``best.safetensors``
beside the other's ``last.safetensors`` and ``metrics.jsonl``), and a ``resume`` removes the
temporary files of killed writes, which would be the in-flight files of a live run. `RunLock`
makes the second writer refuse at once, with one line naming the folder and the process that
holds it (pid, host, since when, command line) and what to do.

Why a leftover lock file is never a problem:

* The lock is the kernel's (``fcntl.flock``), not the file's existence. The kernel attaches it
  to the open file and drops it when the last descriptor to it is closed, which happens
  when the process exits for any reason, ``kill -9`` and power loss included. A lock file left
  by a killed run is just a file: the next run locks it and rewrites its content, which
  therefore always describes the live holder.
* `release` removes the file while it still holds the lock, and `acquire` checks after locking
  that the file it locked is still the one at the path (same device and inode); if a holder
  removed it in between, it tries again. So removing the file cannot let two runs hold two
  different files.
* Forked children (DataLoader workers) inherit the descriptor and with it the lock; this
  module closes it in every child forked with `os.fork`, so a worker that outlives its parent
  does not keep the folder locked.

Limits: on NFS, Linux emulates ``flock`` with POSIX byte-range locks (NLM or NFSv4), which work
between machines when the server's lock service does, but are per process and outlive a
crashed client until the server's lease expires (about 90 s). Within one process a second
acquire of the same folder is refused by this module's own table, not by the kernel, so it
holds there too. On Windows ``msvcrt.locking`` locks one byte far past the content (so others
can still read who holds it). A file system without locks (``ENOLCK``), or a platform without
``fcntl`` and ``msvcrt``, gets a `RuntimeWarning` and an unlocked run.

Taking the lock is also the writability check: the folder and the lock file are created
first, so a read-only or missing-permission place fails here, before any training, with one
`OutputDirError` line naming the folder.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from tlkit._fs import SymlinkRefused, open_no_follow

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RUN_FILES", "RUN_RECORDS", "OutputDirError", "RunExistsError", "RunLock", "RunLockedError", "check_run_folder", "held_lock", "run_files_in"]

LOCK_NAME = ".tlkit.lock"
_WINDOWS_LOCK_OFFSET = 1 << 30  # a locked region cannot be read by others on Windows: lock past the content
_MAX_COMMAND = 300  # characters of the holder's command line in the message (one line, readable)
_held: dict[tuple[int, int], RunLock] = {}  # this process's locks, by (st_dev, st_ino) of the folder
_held_guard = threading.Lock()


class RunLockedError(RuntimeError):
    """The run folder is locked by another run (or already by this process).

    Attributes:
        folder: the run folder.
        holder: what the holder wrote in the lock file (``pid``, ``host``, ``started``,
            ``command``), or ``None`` when it could not be read.
    """

    def __init__(self, message: str, folder: Path, holder: dict[str, Any] | None = None):
        super().__init__(message)
        self.folder = folder
        self.holder = holder


RUN_FILES = ("last.state.pt", "last.safetensors", "best.safetensors", "metrics.jsonl", "report.json", "report.md",
             "MODEL_CARD.md", "curves.png", "confusion_matrix.png", "top_losses.png",
             "metrics.csv", "tensorboard", "mlflow.db", "mlartifacts")
"""Every file (and folder) a training run and its loggers write into the run folder: the one list
that says whether a folder holds a run, and what ``overwrite`` removes. ``config.yaml`` and its
signature (`RUN_RECORDS`) are written before the run starts and are not a run by themselves."""

RUN_RECORDS = ("config.yaml", ".tlkit-origin")
"""What starting a run records before training (`tlkit.run.record_config`); replaced with the run."""


def run_files_in(folder: str | Path) -> list[str]:
    """The names of `RUN_FILES` that exist in ``folder`` (none when it does not exist)."""
    return [name for name in RUN_FILES if os.path.lexists(Path(folder) / name)]


def _remove(path: Path) -> None:
    """Delete a run file or folder; a symbolic link is removed itself, never what it points at."""
    import shutil

    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def check_run_folder(folder: str | Path, *, overwrite: bool = False) -> list[str]:
    """Make sure a new run may start in ``folder``: no other run's files, or ``overwrite``.

    Call it before writing anything of the new run (a ``config.yaml``); `FineTuner.fit` calls it
    itself. With ``overwrite`` the old run's `RUN_FILES` and `RUN_RECORDS` are deleted (stale ones
    would lie about the new run, such as a ``best.safetensors`` it never wrote, or a
    ``metrics.csv`` of a logger it does not use).

    Returns:
        The names of the files deleted.

    Raises:
        RunExistsError: ``folder`` holds run files and ``overwrite`` is false.
    """
    found = run_files_in(folder)
    if found and not overwrite:
        raise RunExistsError(Path(folder), found)
    if overwrite:
        for name in [*found, *RUN_RECORDS]:
            _remove(Path(folder) / name)
    return found


class RunExistsError(ValueError):
    """The run folder holds another run's files and neither resume nor overwrite was asked for.

    Attributes:
        folder: the run folder.
        files: the run files found there.
    """

    def __init__(self, folder: Path, files: list[str]):
        super().__init__(f"{folder} already holds a run ({', '.join(files)}); continue it with --resume "
                         "(Python: fit(resume=True)), replace it with --overwrite (fit(overwrite=True)), "
                         "or choose another output_dir")
        self.folder, self.files = folder, files


class OutputDirError(OSError):
    """The run folder or its lock file cannot be created or written (read-only, no permission, full).

    An `OSError` whose ``errno`` is the cause's and whose ``filename`` is the folder; its message
    is one line naming the folder.
    """

    def __init__(self, folder: Path, error: OSError, what: str = "cannot write the run folder"):
        reason = error.strerror or str(error)
        code = f" (errno {error.errno})" if error.errno else ""
        if isinstance(error, SymlinkRefused):  # a planted link: nothing to fix in permissions
            super().__init__(f"{folder}: {Path(error.filename).name} {reason}")
        else:
            super().__init__(f"{folder}: {what}: {reason}{code}; fix its permissions or free space, "
                             "or choose another output_dir")
        self.errno, self.strerror, self.filename = error.errno, reason, str(folder)

    def __str__(self) -> str:  # OSError would print "[Errno N] strerror: filename" instead
        return str(self.args[0])


def held_lock(folder: str | Path) -> RunLock | None:
    """The `RunLock` this process holds on ``folder``, or ``None``.

    Lets code that may run inside a caller's lock (``FineTuner.fit`` under ``tlkit train``)
    skip taking it again, which `RunLock.acquire` refuses.
    """
    try:
        key = _folder_key(Path(folder))
    except OSError:
        return None
    with _held_guard:
        return _held.get(key)


class RunLock:
    """An exclusive, non-blocking lock on a run folder, held from `acquire` to `release`.

    Use it as a context manager (``with RunLock(out): ...``) or call `acquire` and, in a
    ``finally``, `release`. It is not re-entrant: a second acquire of the same folder, from
    this process or another, raises `RunLockedError`.

    Args:
        folder: the run folder; created (with its parents) by `acquire` if missing.
        name: the lock file's name inside ``folder``.
    """

    def __init__(self, folder: str | Path, name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.info: dict[str, Any] = {}
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None
        self._created = False

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.folder)!r}, locked={self.locked})"

    def acquire(self) -> RunLock:
        """Create the folder if needed, lock it and record this process in the lock file.

        Returns:
            ``self``.

        Raises:
            RunLockedError: another process, or this one, holds the folder's lock (one line
                naming the folder and the holder's pid, host, start time and command).
            OutputDirError: the folder or the lock file cannot be created or written.
        """
        if self._fd is not None:
            raise RunLockedError(f"{self.folder}: this RunLock is already held; release it first", self.folder)
        self._created = self._make_folder()
        try:
            key = _folder_key(self.folder)
        except OSError as e:
            raise OutputDirError(self.folder, e) from e
        with _held_guard:
            if key in _held:
                raise RunLockedError(_same_process_message(self.folder, _held[key].info), self.folder,
                                     _held[key].info)
            fd = self._open_locked()
            _held[key] = self
        self._fd, self._key = fd, key
        try:
            self.info = _write_info(fd)
        except OSError as e:  # a full disk shows here, before training, not at the first checkpoint
            self.release()
            raise OutputDirError(self.folder, e) from e
        return self

    def release(self) -> None:
        """Drop the lock and remove the lock file (and the folder, if `acquire` made it and it is empty).

        Idempotent; never raises for a file or folder that is already gone.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if msvcrt is not None and fcntl is None:
                _windows_unlock(fd)
                os.close(fd)  # Windows cannot remove an open file
                self._remove_files()
            else:
                self._remove_files()  # while still locked: see the module docstring
                os.close(fd)  # the kernel drops the lock here
        finally:
            with _held_guard:
                if _held.get(self._key) is self:
                    del _held[self._key]

    def _remove_files(self) -> None:
        for remove, path in ((os.unlink, self.path), (os.rmdir, self.folder if self._created else None)):
            if path is not None:
                try:
                    remove(path)
                except OSError:  # gone already, or the folder holds the run's files: keep it
                    pass

    def _make_folder(self) -> bool:
        """Create the folder; whether it was missing. Raises `OutputDirError`."""
        try:
            self.folder.mkdir(parents=True)
            return True
        except OSError as e:
            # An existing folder may answer EROFS or EACCES rather than EEXIST: the lock file's
            # creation tells whether it is writable.
            if _is_dir(self.folder):
                return False
            what = "exists and is not a folder" if isinstance(e, FileExistsError) else "cannot create the run folder"
            raise OutputDirError(self.folder, e, what) from e

    def _open_locked(self) -> int:
        """Open and lock the lock file, retrying while a releasing holder replaces it."""
        for _ in range(20):
            try:
                # O_NOFOLLOW: a lock file planted as a link to ~/notes.txt must not become our JSON.
                fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a run that just ended removed the folder it had made
                self._make_folder()
                continue
            except OSError as e:
                raise OutputDirError(self.folder, e) from e
            try:
                if not _try_lock(fd, self.folder):
                    holder = _read_info(fd)
                    raise RunLockedError(_busy_message(self.folder, holder), self.folder, holder)
                if _same_file(fd, self.path):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # locked a file its holder removed on release: lock the new one
        raise RunLockedError(f"{self.folder}: could not take the run lock: {self.path.name} keeps being "
                             "replaced; is another program removing it?", self.folder)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _folder_key(folder: Path) -> tuple[int, int]:
    st = os.stat(folder)
    return st.st_dev, st.st_ino


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _try_lock(fd: int, folder: Path) -> bool:
    """Take the exclusive lock without waiting; ``False`` when another open file holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            warnings.warn("tlkit: this platform has no file locks; two runs in one folder are not detected",
                          RuntimeWarning, stacklevel=4)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EDEADLK) and fcntl is None:  # msvcrt's "region locked"
            return False
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            warnings.warn(f"tlkit: the file system of {folder} has no file locks ({e.strerror}); "
                          "two runs in one folder are not detected", RuntimeWarning, stacklevel=4)
            return True
        raise


def _windows_unlock(fd: int) -> None:
    try:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass  # closing the file drops it too


def _write_info(fd: int) -> dict[str, Any]:
    """Record this process in the (locked) lock file, replacing a dead holder's record."""
    now = time.time()
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(now)),
        "started_unix": now,
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
    }
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    if os.write(fd, data) != len(data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return info


def _read_info(fd: int) -> dict[str, Any] | None:
    """The holder's record; ``None`` if unreadable. Retries briefly: a new holder writes it just after locking."""
    for _ in range(10):
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            info = json.loads(os.read(fd, 1 << 16) or b"null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            return info
        time.sleep(0.05)
    return None


def _shown(value: Any, limit: int = 80) -> str:
    """A lock record's field for a message: one line, control characters escaped, at most ``limit``.

    The record is a file in a folder that may come from anyone (a planted ``.tlkit.lock``)."""
    from tlkit._text import escape_control

    text = escape_control(" ".join(str(value).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "a process whose record could not be read"
    since = _shown(holder.get("started", "?"), 40)
    if isinstance(holder.get("started_unix"), (int, float)):
        since += f" ({max(0, round(time.time() - holder['started_unix']))} s ago)"
    return (f"pid {_shown(holder.get('pid', '?'), 20)} on host {_shown(holder.get('host', '?'))}, since {since}, "
            f"command: {_shown(holder.get('command', '?'), _MAX_COMMAND)}")


def _busy_message(folder: Path, holder: dict[str, Any] | None) -> str:
    note = ""
    pid = holder.get("pid") if holder else None
    if holder and holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        note = f" (pid {pid} has ended; a process it started still holds the lock)"
    return (f"{folder} is in use by another run: {_describe(holder)}{note}; wait for it to end or stop it, "
            "or choose another output_dir")


def _same_process_message(folder: Path, holder: dict[str, Any]) -> str:
    return (f"{folder} is already locked by this process (pid {os.getpid()}, since {holder.get('started', '?')}): "
            "one run per folder at a time; finish or release the other run first")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def _forget_in_child() -> None:
    """In a forked child: close the inherited lock files, so a child never holds a run's lock."""
    global _held_guard
    _held_guard = threading.Lock()  # another thread may have held it at the fork
    for lock in _held.values():
        if lock._fd is not None:
            try:
                os.close(lock._fd)  # closes the child's copy only; the parent keeps its lock
            except OSError:
                pass
            lock._fd = None
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
