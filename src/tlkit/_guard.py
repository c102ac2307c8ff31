"""What holds for a whole run: one writer per run folder, a finished run never overwritten unasked,
and SIGTERM handled like Ctrl-C."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tlkit._signals import interrupt_on_signals
from tlkit.distributed import broadcast_object
from tlkit.runlock import OutputDirError, RunExistsError, RunLock, RunLockedError, check_run_folder, held_lock

if TYPE_CHECKING:
    from tlkit._protocols import Run

__all__ = ["claim_run_folder", "run_lock", "run_guard"]

_guarded: set[str] = set()  # run folders this process is inside a run_lock block for, on every rank


@contextlib.contextmanager
def run_lock(tuner: Run) -> Iterator[RunLock | None]:
    """Hold ``tuner.output_dir``'s `RunLock` for the block (nothing without an output folder).

    The lock is taken on the main process; under torchrun its refusal is sent to every rank so
    all of them raise it (else the others would wait in their first collective). A lock this
    process already holds on the folder (the CLI takes it before writing ``config.yaml``) is
    kept, not taken twice.

    Raises:
        RunLockedError: another process trains into the folder (names it).
        OutputDirError: the folder cannot be created or written (one line, before any training).
    """
    out = tuner.output_dir
    key = str(Path(out).resolve()) if out is not None else None
    # Nested guards (tlkit train guards before writing config.yaml, then fit guards again) are
    # decided the same way on every rank: only rank 0 holds the lock, so held_lock() alone would
    # send the other ranks into a broadcast rank 0 never makes.
    if key is None or key in _guarded:
        yield held_lock(out) if out is not None else None
        return
    lock, error = RunLock(out), None
    if tuner.is_main:
        try:
            lock.acquire()
        except (RunLockedError, OutputDirError) as e:
            error = e
    if tuner.dist is not None:
        message = broadcast_object(str(error) if error is not None else None)
        if message is not None and error is None:
            error = RunLockedError(message, out)
    if error is not None:
        raise error
    _guarded.add(key)
    try:
        yield lock
    finally:
        _guarded.discard(key)
        if lock.locked:
            lock.release()


@contextlib.contextmanager
def run_guard(tuner: Run) -> Iterator[None]:
    """`run_lock` plus SIGTERM raising `TrainingInterrupted` (a ``KeyboardInterrupt``), restored after."""
    with interrupt_on_signals(), run_lock(tuner):
        yield


def claim_run_folder(tuner: Run, *, resume: bool | str | Path = False, overwrite: bool = False) -> None:
    """Refuse to start a new run over another run's files; with ``overwrite``, delete them first.

    Called under the run's lock, before anything is written. Resuming (``resume`` true) keeps
    the files: the loop continues from them. Decided on the main process; under torchrun every
    rank raises the same error.

    Raises:
        RunExistsError: ``output_dir`` holds `tlkit.runlock.RUN_FILES`, ``resume`` and ``overwrite`` are false.
    """
    out = tuner.output_dir
    if out is None or resume:
        return
    refused: list[str] = []
    if tuner.is_main:
        try:
            check_run_folder(out, overwrite=overwrite)
        except RunExistsError as e:
            refused = e.files
    if tuner.dist is not None:
        refused = broadcast_object(refused)
    if refused:
        raise RunExistsError(Path(out), refused)
