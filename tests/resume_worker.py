"""Helper process for test_crash_resume.py (not a test module): train, get SIGKILLed, resume.

Usage: ``python resume_worker.py PLAN.json``. The plan names the data folders and a list of
runs. This process imports torch, timm and tlkit once and then forks one child per run, so
each run starts as a new process that has only imported the libraries, without paying the
import time again. The children run one after another:

- ``{"dir": D}``: a plain run in output folder D (the uninterrupted reference);
- ``{"dir": D, "resume": true, ...}``: ``fit(..., resume=True)`` in D;
- ``"poll": n``: this parent SIGKILLs the child as soon as ``D/metrics.jsonl`` has ``n`` lines
  written by that child (a kill at whatever point the child has reached);
- ``"kill": {"file": F, "epoch": e, "when": "after" | "during"}``: the child SIGKILLs itself
  right after (or halfway through) writing file F in the epoch-end writes of epoch number
  ``e`` (1-based) or later (a kill at an exact point between two checkpoint files).

Prints one JSON line: for each run, ``"killed"``, ``"exit 0"`` or ``"exit N"``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from conftest import tiny_tuner  # noqa: E402

import tlkit._training.state as run_state  # noqa: E402
import tlkit.checkpoint as ck  # noqa: E402
from tlkit import FreezePolicy, ImageFolderDataset  # noqa: E402
from tlkit.callbacks import Callback  # noqa: E402

CLASSES = ["cardboard", "glass", "metal"]
POLICY = FreezePolicy.linear_probe().then(2, depth=-3, layer_decay=0.5)  # unfreezes at epoch 2
EPOCHS = 4


class EpochTracker(Callback):
    """Knows which epoch's end-of-epoch files are being written (None outside those writes)."""

    def __init__(self) -> None:
        self.epoch: int | None = None

    def on_epoch_end(self, tuner, record) -> None:
        self.epoch = record["epoch"]

    def on_checkpoint_saved(self, tuner, paths) -> None:
        self.epoch = None


class EpochCounter(Callback):
    """Stateful: numbers each epoch into its record, so the records show the state survived a kill."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]

    def on_epoch_end(self, tuner, record) -> None:
        self.count += 1
        record["counted"] = self.count


def install_kill_hook(kill: dict) -> EpochTracker:
    tracker = EpochTracker()
    write = ck.atomic_write_bytes

    def killing_write(path, data):
        path = Path(path)
        hit = path.name == kill["file"] and (tracker.epoch or -1) >= kill["epoch"]
        if hit and kill["when"] == "during":
            path.with_name(f".{path.name}.tmp-{os.getpid()}").write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        out = write(path, data)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    ck.atomic_write_bytes = killing_write  # used by save_checkpoint and save_training_state
    run_state.atomic_write_bytes = killing_write  # metrics.jsonl
    return tracker


def child(plan: dict, run: dict) -> None:
    try:
        tracker = install_kill_hook(run["kill"]) if run.get("kill") else None
        train = ImageFolderDataset(plan["train"])
        val = ImageFolderDataset(plan["val"])
        tuner = tiny_tuner(CLASSES, output_dir=run["dir"], policy=POLICY, epochs=EPOCHS)
        tuner.callbacks.append(EpochCounter())
        if tracker is not None:
            tuner.callbacks.append(tracker)
        tuner.fit(train, val, resume=bool(run.get("resume")))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def lines_written_since(path: Path, start_ns: int) -> int:
    try:
        if path.stat().st_mtime_ns < start_ns:
            return 0
        return path.read_text().count("\n")
    except OSError:
        return 0


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)  # same kernels in every child; no thread pool exists before fork
    results = []
    for run in plan["runs"]:
        start_ns = time.time_ns()
        pid = os.fork()
        if pid == 0:
            child(plan, run)
        metrics = Path(run["dir"]) / "metrics.jsonl"
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if run.get("poll") and lines_written_since(metrics, start_ns) >= run["poll"]:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            results.append("killed")
        else:
            results.append(f"exit {os.waitstatus_to_exitcode(status)}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
