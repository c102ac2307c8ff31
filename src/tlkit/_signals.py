"""SIGTERM ends a run the way Ctrl-C does: as an exception the training code can clean up after.

Python turns SIGINT into `KeyboardInterrupt`, but leaves SIGTERM (what ``kill``, ``timeout``,
Slurm, Kubernetes and ``torchrun`` send) to the default action, which ends the process at once:
no ``finally`` runs, no message is printed. Inside `interrupt_on_signals` SIGTERM raises
`TrainingInterrupted`, a `KeyboardInterrupt`, so every ``except KeyboardInterrupt`` and
``finally`` sees it, and the command line can say which signal ended the run and how to
resume. The files of the last completed epoch are whatever the loop wrote; this module saves
nothing itself.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["TrainingInterrupted", "exit_status", "interrupt_on_signals"]


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by a signal (``SIGTERM`` by default).

    Attributes:
        signum: the signal number.
        signal_name: its name, e.g. ``"SIGTERM"``.
    """

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal_name}")


def exit_status(error: KeyboardInterrupt) -> int:
    """The shell's exit status for a run ended by ``error``: 128 + the signal number.

    130 for a plain `KeyboardInterrupt` (SIGINT), 143 for `TrainingInterrupted` from SIGTERM.
    """
    return 128 + (error.signum if isinstance(error, TrainingInterrupted) else int(signal.SIGINT))


def _raise_interrupted(signum: int, frame: object) -> None:
    raise TrainingInterrupted(signum)


@contextmanager
def interrupt_on_signals(signals: Sequence[int] = (signal.SIGTERM,)) -> Iterator[bool]:
    """Within the block, each of ``signals`` raises `TrainingInterrupted` in the main thread.

    Python delivers signals to the main thread only and allows handlers to be set only there,
    so in any other thread this does nothing (and yields ``False``). On exit the previous
    handlers come back, also when the block raised. A handler that was not set from Python
    (``signal.getsignal`` returns ``None``) comes back as ``SIG_DFL``.

    Like Ctrl-C, every further signal while the interrupt unwinds the stack raises again.

    Args:
        signals: signal numbers; SIGTERM by default (SIGINT already raises `KeyboardInterrupt`).

    Yields:
        Whether the handlers were installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {}
    try:
        for s in signals:
            previous[s] = signal.getsignal(s)
            signal.signal(s, _raise_interrupted)
        yield True
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
