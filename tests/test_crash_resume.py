"""Resume after SIGKILL at many points gives the same weights as an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import copy_sample

from tlkit.checkpoint import load_checkpoint

WORKER = Path(__file__).with_name("resume_worker.py")
TIMING = {"seconds", "images_per_s"}


def _records(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the worker forks one child per run")
def test_resume_after_sigkill_at_any_point_is_bit_identical(tmp_path):
    train = copy_sample(tmp_path / "train", per_class=4)
    val = copy_sample(tmp_path / "val", per_class=2, offset=10)
    ref, run = tmp_path / "ref", tmp_path / "run"
    # 4 epochs, the FreezePolicy unfreezes three more groups at epoch 2 (see resume_worker.py).
    runs = [
        {"dir": str(ref)},
        # killed by the parent while epoch 1 runs (before the unfreeze boundary)
        {"dir": str(run), "poll": 1},
        # killed between last.safetensors and the files after it (the old write-order bug)
        {"dir": str(run), "resume": True, "kill": {"file": "last.safetensors", "epoch": 2, "when": "after"}},
        # killed by the parent as soon as this run has written two epochs (at the boundary)
        {"dir": str(run), "resume": True, "poll": 2},
        # killed halfway through writing the resume state of the boundary epoch
        {"dir": str(run), "resume": True, "kill": {"file": "last.state.pt", "epoch": 3, "when": "during"}},
        # killed by the parent once the boundary epoch is recorded (after the boundary)
        {"dir": str(run), "resume": True, "poll": 3},
        # killed after the final resume state, before any other file of the last epoch
        {"dir": str(run), "resume": True, "kill": {"file": "last.state.pt", "epoch": 4, "when": "after"}},
        {"dir": str(run), "resume": True},
    ]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"train": str(train), "val": str(val), "runs": runs}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(WORKER), str(plan)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = json.loads(proc.stdout.splitlines()[-1])
    assert statuses == ["exit 0"] + ["killed"] * 6 + ["exit 0"], proc.stderr[-3000:]

    for name in ("last.safetensors", "best.safetensors"):
        want, want_meta = load_checkpoint(ref / name)
        got, got_meta = load_checkpoint(run / name)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), f"{name}: {k}"
        assert got_meta["epoch"] == want_meta["epoch"] and got_meta["metrics"] == want_meta["metrics"]
    assert _records(run) == _records(ref)
    assert [r["epoch"] for r in _records(run)] == [1, 2, 3, 4]
    assert [r["counted"] for r in _records(run)] == [1, 2, 3, 4]  # a callback's state survived every kill
    assert not list(run.glob(".*tmp*"))  # half-written temporaries of killed runs are cleaned up
