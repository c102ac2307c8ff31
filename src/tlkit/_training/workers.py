"""DataLoader worker processes that never outlive the process that started them.

PyTorch's workers notice a dead parent only between samples (``ManagerWatchdog`` compares
``os.getppid()`` every 5 s while a worker waits for work), so a worker busy in
``__getitem__`` (a slow file system, a huge image) outlives a ``kill -9`` of the trainer for as
long as that takes; one was seen running for 115 s, holding memory and open files.
`DieWithParent`, used as the loader's ``worker_init_fn``, asks the Linux kernel to SIGKILL the
worker the moment its parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), then checks that the
parent has not died already (before the request the kernel would not have sent it). On other
POSIX systems a daemon thread in the worker polls the parent once a second instead; on Windows
it does nothing (there ``os.kill`` would terminate the process it asks about, and PyTorch's
watchdog holds a handle of the parent).

It changes no random state, so runs stay bit-identical to runs without it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

__all__ = ["DieWithParent", "die_with_parent", "worker_init_fn"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_S = 1.0  # the watchdog thread's period where there is no prctl


class DieWithParent:
    """A DataLoader ``worker_init_fn``: the worker dies with the process that created this object.

    Picklable (a plain object, no closure), so it also works with the ``spawn`` and
    ``forkserver`` start methods.

    Args:
        then: the caller's own ``worker_init_fn`` (e.g. timm's seeding), called after, with the
            worker id.
    """

    def __init__(self, then: Callable[[int], None] | None = None):
        self.parent_pid = os.getpid()  # the trainer: this object is made where the loader is made
        self.then = then

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.parent_pid)
        if self.then is not None:
            self.then(worker_id)

    def __repr__(self) -> str:
        return f"DieWithParent(parent_pid={self.parent_pid}, then={self.then!r})"


def worker_init_fn(then: Callable[[int], None] | None = None) -> DieWithParent:
    """The ``worker_init_fn`` for a loader: `DieWithParent` around ``then`` (kept if it is one already)."""
    return then if isinstance(then, DieWithParent) else DieWithParent(then)


def die_with_parent(parent_pid: int) -> bool:
    """Make this process die when ``parent_pid`` dies; called in the worker.

    Caveat of ``PR_SET_PDEATHSIG``: the kernel sends the signal when the *thread* that forked the
    worker ends, so a loader must be iterated from a thread that lives as long as its workers
    (``fit`` iterates in the calling thread).

    Args:
        parent_pid: the trainer's pid, taken when the loader was made.

    Returns:
        ``True`` when the kernel will kill this process, ``False`` when a watchdog thread polls
        (or, on Windows, nothing is done). Does not return if the parent is already gone: the
        process kills itself.
    """
    if os.name != "posix":
        return False
    armed = _set_parent_death_signal(signal.SIGKILL)
    if _parent_gone(parent_pid):  # died before the request: the kernel will not signal
        os.kill(os.getpid(), signal.SIGKILL)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="tlkit-parent-watchdog", daemon=True).start()
    return armed


def _set_parent_death_signal(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc symbols (static builds): fall back to polling
        return False


def _parent_gone(parent_pid: int) -> bool:
    if os.getppid() == parent_pid:
        return False
    # Not our parent: it died and we were reparented, or a forkserver started us (then the
    # trainer is alive, and the forkserver, which exits with it, is what the kernel watches).
    return not _running(parent_pid)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (killed, not yet reaped) does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True


def _watch_parent(parent_pid: int) -> None:
    while not _parent_gone(parent_pid):
        time.sleep(_POLL_S)
    os.kill(os.getpid(), signal.SIGKILL)
