"""One run per folder: RunLock between real processes, after kill -9, and on unwritable folders."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tlkit import runlock
from tlkit.runlock import LOCK_NAME, OutputDirError, RunLock, RunLockedError, held_lock

RUNLOCK_PY = Path(runlock.__file__)
# The child processes load runlock.py by path: importing the tlkit package would import torch
# and timm, seconds per process, and the module needs nothing from them.
LOAD = (f"import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('runlock', {str(RUNLOCK_PY)!r})\n"
        f"runlock = importlib.util.module_from_spec(spec); spec.loader.exec_module(runlock)\n")
HOLD = LOAD + ("lock = runlock.RunLock(sys.argv[1]).acquire()\n"
               "print('locked', flush=True)\nimport time; time.sleep(60)\n")
FORK_AND_HOLD = LOAD + (
    "import os, time\nlock = runlock.RunLock(sys.argv[1]).acquire()\nr, w = os.pipe()\n"
    "child = os.fork()\n"
    "if child == 0:\n    os.write(w, b'1')\n    time.sleep(60)\n    os._exit(0)\n"
    "os.read(r, 1)  # the child runs (its fork handlers have run)\n"
    "print('locked', child, flush=True)\ntime.sleep(60)\n")
TRY = LOAD + ("try:\n    runlock.RunLock(sys.argv[1]).acquire()\n    print('acquired')\n"
              "except Exception as e:\n"
              "    print(type(e).__name__, e.errno if isinstance(e, OSError) else '', str(e), sep='|')\n")


@pytest.fixture
def holder():
    """Start a process that holds the lock of a folder; kills it (and what it forked) at the end."""
    started: list[subprocess.Popen] = []

    def start(folder: Path, script: str = HOLD) -> tuple[subprocess.Popen, list[str]]:
        p = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True)
        started.append(p)
        line = p.stdout.readline().split()
        assert line[:1] == ["locked"], f"holder did not lock (exit {p.poll()})"
        return p, line[1:]

    yield start
    for p in started:
        p.kill()
        p.wait()


def wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} still runs after {timeout} s")


def test_a_second_run_refuses_at_once_naming_the_folder_and_the_holder(tmp_path, holder):
    run = tmp_path / "run"
    p, _ = holder(run)
    t0 = time.monotonic()
    with pytest.raises(RunLockedError) as caught:
        RunLock(run).acquire()
    assert time.monotonic() - t0 < 1.0  # refuses, never waits
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{run} is in use by another run: pid {p.pid} on host {socket.gethostname()}, since ")
    assert "command: " in message and "choose another output_dir" in message
    assert caught.value.holder["pid"] == p.pid and caught.value.folder == run
    # and so does a second process
    out = subprocess.run([sys.executable, "-c", TRY, str(run)], capture_output=True, text=True, timeout=30).stdout
    assert out.startswith("RunLockedError||") and f"pid {p.pid}" in out
    assert p.poll() is None  # the holder was not disturbed
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == p.pid


def test_after_kill_9_of_the_holder_the_lock_is_taken_and_names_the_new_holder(tmp_path, holder):
    run = tmp_path / "run"
    p, _ = holder(run)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == p.pid  # the stale file is still there
    with RunLock(run) as lock:
        record = json.loads((run / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record == lock.info and record["command"]
        assert held_lock(run) is lock
    assert not (run / LOCK_NAME).exists() and run.is_dir()  # the folder existed before this lock: kept
    assert held_lock(run) is None


def test_a_forked_child_that_outlives_the_holder_does_not_keep_the_lock(tmp_path, holder):
    run = tmp_path / "run"
    p, (child,) = holder(run, FORK_AND_HOLD)
    child = int(child)
    try:
        p.send_signal(signal.SIGKILL)
        p.wait()
        os.kill(child, 0)  # still alive, like a DataLoader worker that outlived its parent
        with RunLock(run):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_second_acquire_in_the_same_process_refuses(tmp_path):
    run = tmp_path / "run"
    with RunLock(run) as first:
        for spelling in (run, run / ".", tmp_path / ".." / tmp_path.name / "run"):
            with pytest.raises(RunLockedError, match=f"already locked by this process \\(pid {os.getpid()}"):
                RunLock(spelling).acquire()
        with pytest.raises(RunLockedError, match="already held"):
            first.acquire()
        assert first.locked
    assert not first.locked


@pytest.mark.skipif(runlock.fcntl is None, reason="flock semantics are POSIX")
def test_flock_on_a_second_descriptor_of_the_same_process_conflicts(tmp_path):
    # Why the kernel alone would already refuse a double acquire on a local disk: flock locks
    # belong to open file descriptions, not to processes (the in-process table covers NFS).
    import fcntl

    path = tmp_path / "f"
    a, b = os.open(path, os.O_RDWR | os.O_CREAT), os.open(path, os.O_RDWR)
    try:
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(a)
        os.close(b)


def test_release_removes_what_acquire_made_and_a_new_lock_follows(tmp_path):
    run = tmp_path / "a" / "run"
    lock = RunLock(run).acquire()
    assert (run / LOCK_NAME).is_file()
    lock.release()
    lock.release()  # idempotent
    assert not run.exists()  # made by acquire and still empty: removed, like a run that wrote nothing
    with RunLock(run):
        (run / "metrics.jsonl").write_text("{}\n")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]  # the run's files stay


def test_a_run_folder_under_a_regular_file_fails_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for folder, what in ((tmp_path / "file" / "run", "cannot create the run folder"),
                         (tmp_path / "file", "exists and is not a folder")):
        with pytest.raises(OutputDirError) as caught:
            RunLock(folder).acquire()
        assert str(caught.value).startswith(f"{folder}: {what}: ") and "\n" not in str(caught.value)
        assert isinstance(caught.value, OSError) and caught.value.filename == str(folder)
    assert caught.value.errno == errno.EEXIST


def _without_dac_override() -> None:
    """In the child before exec: drop root's power to write through permissions (bounding set)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_a_read_only_folder_fails_in_one_line_before_anything_else(tmp_path):
    # Root writes through chmod 0o555, so as root the attempt runs in a child process that has
    # dropped CAP_DAC_OVERRIDE; for it the permission bits hold as for any user.
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        for folder, what in ((ro, "cannot write the run folder"), (ro / "run", "cannot create the run folder")):
            if os.geteuid() == 0:
                try:
                    out = subprocess.run([sys.executable, "-c", TRY, str(folder)], capture_output=True, text=True,
                                         timeout=30, preexec_fn=_without_dac_override).stdout.strip()
                except subprocess.SubprocessError as e:  # no CAP_SETPCAP (a locked-down container)
                    pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE: {e}")
                kind, code, message = out.split("|", 2)
            else:
                with pytest.raises(OutputDirError) as caught:
                    RunLock(folder).acquire()
                kind, code, message = "OutputDirError", str(caught.value.errno), str(caught.value)
            assert kind == "OutputDirError" and int(code) == errno.EACCES
            assert message == (f"{folder}: {what}: Permission denied (errno 13); fix its permissions or free "
                               "space, or choose another output_dir")
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(ro, 0o755)


def test_a_full_disk_at_acquire_is_an_output_dir_error_and_leaves_no_lock(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runlock, "_write_info", full)
    with pytest.raises(OutputDirError, match=r"No space left on device \(errno 28\)"):
        RunLock(tmp_path / "run").acquire()
    assert held_lock(tmp_path) is None and not (tmp_path / "run").exists()


def test_without_file_locks_a_warning_says_two_runs_are_not_detected(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "fcntl", None)
    monkeypatch.setattr(runlock, "msvcrt", None)
    with pytest.warns(RuntimeWarning, match="no file locks"):
        with RunLock(tmp_path / "run"):
            assert (tmp_path / "run" / LOCK_NAME).is_file()
