"""A full disk (or any OSError) while writing run files is one line naming the file and what is kept."""

import errno
import os

import pytest
import torch

from tlkit._runfiles import RunFileError, run_file_error, run_file_writes
from tlkit.checkpoint import atomic_write_bytes, load_training_state, save_checkpoint, save_training_state


@pytest.fixture
def disk_full(monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return lambda: monkeypatch.setattr(os, "fsync", full)


def test_atomic_write_bytes_names_the_file_it_failed_to_write(tmp_path, disk_full):
    disk_full()
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(tmp_path / "metrics.jsonl", b"{}\n")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "metrics.jsonl")
    assert str(caught.value) == f"[Errno 28] No space left on device: '{tmp_path / 'metrics.jsonl'}'"
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_a_full_disk_on_the_state_keeps_the_previous_epoch_in_one_line(tmp_path, disk_full):
    run = tmp_path / "run"
    save_training_state(run / "last.state.pt", {"epoch": 2})  # what epoch 2 left
    disk_full()
    with pytest.raises(RunFileError) as caught:
        with run_file_writes(run, epoch=3):
            save_training_state(run / "last.state.pt", {"epoch": 3})
    assert str(caught.value) == (
        f"{run / 'last.state.pt'}: No space left on device (errno 28) while writing the files of epoch 3; "
        "the resume state of epoch 2 is kept; free space and rerun with --resume (resume=True in Python)")
    e = caught.value
    assert isinstance(e, OSError) and (e.errno, e.filename, e.epoch) == (28, str(run / "last.state.pt"), 3)
    assert isinstance(e.__cause__, OSError) and not isinstance(e.__cause__, RunFileError)
    assert load_training_state(run / "last.state.pt")["epoch"] == 2
    assert sorted(p.name for p in run.iterdir()) == ["last.state.pt"]


def test_a_full_disk_after_the_state_says_resume_rewrites_the_rest(tmp_path, disk_full):
    disk_full()
    with pytest.raises(RunFileError, match=r"last\.safetensors: No space left on device \(errno 28\) while writing "
                       r"the files of epoch 3; the resume state of epoch 3 was written before it, and resume "
                       r"rewrites the rest; free space"):
        with run_file_writes(tmp_path, epoch=3):
            save_checkpoint(tmp_path / "last.safetensors", {"w": torch.zeros(2)}, {})


def test_in_the_first_epoch_resume_starts_at_epoch_1(tmp_path, disk_full):
    disk_full()
    with pytest.raises(RunFileError, match="no epoch had ended yet, so resume starts at epoch 1"):
        with run_file_writes(tmp_path, epoch=1):
            save_training_state(tmp_path / "last.state.pt", {"epoch": 1})


def test_other_errors_name_the_target_of_a_temporary_file_or_the_folder(tmp_path):
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".best.safetensors.tmp-123"))
    assert str(run_file_error(denied, tmp_path, epoch=1)) == (
        f"{tmp_path / 'best.safetensors'}: Permission denied (errno 13) while writing the files of epoch 1; the "
        f"resume state of epoch 1 was written before it, and resume rewrites the rest; make {tmp_path} writable "
        "and rerun with --resume (resume=True in Python)")
    assert str(run_file_error(OSError("boom"), tmp_path)) == (
        f"{tmp_path}: boom while writing the run files; the files written before it are kept; fix the cause "
        "and rerun with --resume (resume=True in Python)")
    renamed = OSError(errno.EIO, "Input/output error")
    renamed.filename, renamed.filename2 = str(tmp_path / ".x.tmp-1"), str(tmp_path / "metrics.jsonl")
    assert str(run_file_error(renamed, tmp_path, epoch=2)).startswith(f"{tmp_path / 'metrics.jsonl'}: Input/output")
    assert str(run_file_error(OSError(errno.EIO, "Input/output error"), tmp_path, epoch=2)).endswith(
        "while writing the files of epoch 2; the last resume state written is kept; fix the cause and rerun with "
        "--resume (resume=True in Python)")


def test_a_run_file_error_from_inside_passes_as_it_is(tmp_path):
    inner = run_file_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path, epoch=5)
    with pytest.raises(RunFileError) as caught:
        with run_file_writes(tmp_path, epoch=1):
            raise inner
    assert caught.value is inner
    with pytest.raises(ValueError):  # not an OSError: untouched
        with run_file_writes(tmp_path, epoch=1):
            raise ValueError("x")
