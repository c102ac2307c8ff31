"""DataLoader workers started with DieWithParent die with a kill -9'd trainer; plain ones do not."""

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from tlkit._training import workers
from tlkit._training.workers import DieWithParent, worker_init_fn

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# Two persistent loaders of two workers each, one with DieWithParent (composed with the caller's
# own worker_init_fn, which reports the pid) and one without. Every sample takes a minute, so the
# workers are inside __getitem__, where PyTorch's own watchdog does not look, when the trainer dies.
TRAINER = f"""
import os, sys, time
import importlib.util
spec = importlib.util.spec_from_file_location("workers", {workers.__file__!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
import torch

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 100
    def __getitem__(self, i):
        time.sleep(60)
        return i

def report(tag):
    def init(worker_id):
        # one write(2) of under PIPE_BUF bytes: atomic, so four workers' lines never interleave
        os.write(1, f"worker {{tag}} {{os.getpid()}}\\n".encode())
    return init

loaders = [torch.utils.data.DataLoader(Slow(), num_workers=2, persistent_workers=True, worker_init_fn=fn)
           for fn in (mod.DieWithParent(report("tlkit")), report("plain"))]
iterators = [iter(loader) for loader in loaders]
time.sleep(60)
"""


def running(pid: int) -> bool:
    """Whether pid runs; a zombie (killed, not reaped yet, e.g. under a container's init) does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False


def test_workers_die_within_seconds_of_a_kill_9_of_the_trainer():
    p = subprocess.Popen([sys.executable, "-c", TRAINER], stdout=subprocess.PIPE, text=True)
    pids: dict[str, list[int]] = {"tlkit": [], "plain": []}
    try:
        while sum(map(len, pids.values())) < 4:
            line = p.stdout.readline()
            assert line, f"trainer ended (exit {p.wait()}) before its workers started"
            fields = line.split()
            if len(fields) == 3 and fields[0] == "worker":  # anything else on stdout is not ours
                pids[fields[1]].append(int(fields[2]))
        p.send_signal(signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 5
        while any(map(running, pids["tlkit"])) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(running, pids["tlkit"])), f"workers {pids['tlkit']} outlived the trainer by 5 s"
        # The control: without it the workers are still there, busy in __getitem__.
        assert all(map(running, pids["plain"]))
    finally:
        p.kill()
        for pid in pids["plain"] + pids["tlkit"]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_worker_whose_parent_is_already_gone_kills_itself():
    # The race: the trainer dies between fork and the prctl call. A pid that is dead and not
    # the child's parent stands for it.
    gone = subprocess.Popen(["true"])
    gone.wait()
    child = subprocess.run([sys.executable, "-c", f"""
import importlib.util
spec = importlib.util.spec_from_file_location("workers", {workers.__file__!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
mod.die_with_parent({gone.pid})
print("survived")
"""], capture_output=True, text=True, timeout=30)
    assert child.returncode == -signal.SIGKILL and "survived" not in child.stdout


def test_it_composes_with_the_callers_worker_init_fn_and_pickles():
    fn = worker_init_fn(print)
    assert isinstance(fn, DieWithParent) and fn.then is print and fn.parent_pid == os.getpid()
    assert worker_init_fn(fn) is fn  # not wrapped twice
    again = pickle.loads(pickle.dumps(fn))  # spawn and forkserver pickle the worker_init_fn
    assert again.parent_pid == fn.parent_pid and again.then is print
