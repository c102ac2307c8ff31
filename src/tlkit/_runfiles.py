"""A failed write of a run file becomes one line: the file, the reason, what is kept, what to do.

A full disk during ``fit`` used to end in a 22-line traceback from deep inside ``torch.save``
or ``os.fsync`` that named no file. The loop wraps its writes in `run_file_writes`, which turns
any `OSError` into a `RunFileError`::

    runs/x/last.state.pt: No space left on device (errno 28) while writing the files of epoch 3;
    the resume state of epoch 2 is kept; free space and rerun with --resume (resume=True in Python)

Epochs are numbered from 1, as in ``metrics.jsonl`` and the NaN-loss error. What is kept follows
from the write order of an epoch (``last.state.pt`` first, then ``last.safetensors``,
``best.safetensors``, ``metrics.jsonl``, all atomic): if the state failed, the previous
epoch's state is intact; if a later file failed, this epoch's state was written and resume
rewrites the other files from it.
"""

from __future__ import annotations

import errno as errnos
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["RunFileError", "run_file_error", "run_file_writes"]

STATE_SUFFIX = ".state.pt"
_NO_SPACE = {errnos.ENOSPC, getattr(errnos, "EDQUOT", errnos.ENOSPC), errnos.EFBIG}
_NOT_WRITABLE = {errnos.EACCES, errnos.EPERM, errnos.EROFS}


class RunFileError(OSError):
    """Writing a file of the run folder failed; the message is one line (see the module docstring).

    Attributes:
        errno: the cause's errno (``None`` if it had none).
        strerror: the cause's text, e.g. ``"No space left on device"``.
        filename: the run file that failed (the folder when the cause named none).
        epoch: the epoch whose files were being written, or ``None``.
    """

    def __init__(self, message: str, error: OSError, path: str | Path, epoch: int | None = None):
        super().__init__(message)
        self.errno, self.strerror, self.filename = error.errno, error.strerror or str(error), str(path)
        self.epoch = epoch

    def __str__(self) -> str:  # OSError would print "[Errno N] strerror: filename" instead
        return str(self.args[0])


def run_file_error(error: OSError, output_dir: str | Path, epoch: int | None = None) -> RunFileError:
    """The one-line `RunFileError` for ``error``, raised while writing the files of ``epoch``.

    Args:
        error: the cause. Its ``filename2`` (a rename's target) or ``filename`` names the file;
            `tlkit.checkpoint.atomic_write_bytes` sets ``filename`` to the file it writes.
        output_dir: the run folder, named when the cause names no file.
        epoch: the epoch (numbered from 1) whose files were being written; ``None`` for other run files
            (the run report at the end).

    Returns:
        The error, for the caller to raise ``from error``.
    """
    named = error.filename2 or error.filename
    path = _target(Path(os.fsdecode(named))) if named else None
    reason = error.strerror or str(error) or type(error).__name__
    code = f" (errno {error.errno})" if error.errno is not None else ""
    if error.errno in _NO_SPACE:
        todo = "free space"
    elif error.errno in _NOT_WRITABLE:
        todo = f"make {output_dir} writable"
    else:
        todo = "fix the cause"
    what = "the run files" if epoch is None else f"the files of epoch {epoch}"
    message = (f"{path or output_dir}: {reason}{code} while writing {what}; {_kept(path, epoch)}; "
               f"{todo} and rerun with --resume (resume=True in Python)")
    return RunFileError(message, error, path or output_dir, epoch)


def _target(path: Path) -> Path:
    """The file a temporary ``.NAME.tmp-PID`` of an atomic write stands for; other paths as they are."""
    name = path.name
    if name.startswith(".") and ".tmp-" in name:
        return path.with_name(name[1:name.rindex(".tmp-")])
    return path


def _kept(path: Path | None, epoch: int | None) -> str:
    """What the run folder still holds, from an epoch's write order (state first)."""
    if epoch is None:
        return "the files written before it are kept"
    if path is None:
        return "the last resume state written is kept"
    if not path.name.endswith(STATE_SUFFIX):
        return f"the resume state of epoch {epoch} was written before it, and resume rewrites the rest"
    if epoch <= 1:
        return "no epoch had ended yet, so resume starts at epoch 1"
    return f"the resume state of epoch {epoch - 1} is kept"


@contextmanager
def run_file_writes(output_dir: str | Path, epoch: int | None = None) -> Iterator[None]:
    """Within the block, an `OSError` is raised again as the one-line `RunFileError`.

    Args:
        output_dir: the run folder.
        epoch: the epoch (numbered from 1) whose files the block writes; ``None`` for other run files.

    Raises:
        RunFileError: a write in the block failed (a `RunFileError` from inside passes as is).
    """
    try:
        yield
    except RunFileError:
        raise
    except OSError as e:
        raise run_file_error(e, output_dir, epoch) from e
