"""DDP under torchrun: 2 gloo processes on the CPU against one process with the same global batch.

One torchrun launch runs every 2-process run (see ddp_worker.py); the one-process runs happen
in this process. Weights are compared tensor by tensor and metrics epoch by epoch.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import copy_sample, tiny_tuner
from ddp_worker import prepare_photos, run_plan
from safetensors.torch import load_file

from tlkit import ImageFolderDataset
from tlkit.distributed import DistributedContext, all_reduce_sum, gather_shards, shard_indices

HERE = Path(__file__).resolve().parent
B = 4  # per process under torchrun; the one-process runs use 2 * B


def _assert_same_run(a: Path, b: Path, atol: float = 2e-5) -> None:
    wa, wb = load_file(str(a / "last.safetensors")), load_file(str(b / "last.safetensors"))
    assert wa.keys() == wb.keys()
    moved = 0
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=atol, rtol=1e-4), k
    ha = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in ha] == [r["epoch"] for r in hb]
    for ra, rb in zip(ha, hb):
        assert ra["confusion_matrix"] == rb["confusion_matrix"]
        assert ra["top1"] == rb["top1"]
        assert ra["trainable_params"] == rb["trainable_params"]
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-4)
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        moved += 1
    assert moved == len(ha) >= 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    photos = prepare_photos(root / "photos")
    def one(name, **kw):
        return {"dir": str(root / name), "batch_size": 2 * B, "epochs": 3, "data": str(photos), **kw}

    def two(name, **kw):
        return {"dir": str(root / name), "batch_size": B, "epochs": 3, "data": str(photos), **kw}

    # One process: the references, and a run stopped after epoch 1 for the 2-process resume.
    assert run_plan([one("t1", scenario="tensors"), one("c1", scenario="cached"),
                     one("t1-crash", scenario="tensors", crash_after=2)]) == ["done", "done", "crashed"]
    shutil.copytree(root / "t1-crash", root / "t1-crash-resumed-in-2")

    plan = [two("t2", scenario="tensors"), two("c2", scenario="cached"),
            two("t2-crash", scenario="tensors", crash_after=2),
            two("t1-crash-resumed-in-2", scenario="tensors", resume=True)]
    (root / "plan.json").write_text(json.dumps(plan))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "ddp_worker.py"), str(root / "plan.json")],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # And back: the run the 2 processes stopped after epoch 1, finished in one process.
    shutil.copytree(root / "t2-crash", root / "t2-crash-resumed-in-1")
    assert run_plan([one("t2-crash-resumed-in-1", scenario="tensors", resume=True)]) == ["done"]
    return root


def _outcome(path: Path) -> dict:
    return json.loads((path / "outcome.json").read_text())


def test_two_processes_match_one_across_an_unfreeze(runs):
    assert _outcome(runs / "t2") == {"outcome": "done", "world_size": 2, "feature_cache_misses": 0}
    _assert_same_run(runs / "t2", runs / "t1")
    # The unfreeze at epoch 1 changed what DDP reduces: more trainable parameters, and they moved.
    history = [json.loads(x) for x in (runs / "t2" / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["trainable_params"] < history[1]["trainable_params"]


def test_two_processes_match_one_for_a_cached_linear_probe(runs):
    out = _outcome(runs / "c2")
    assert out["outcome"] == "done" and out["world_size"] == 2
    assert out["feature_cache_misses"] == 2  # train and val features, extracted once, sharded
    history = [json.loads(x) for x in (runs / "c2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["cached_features"] for r in history] == [True, False, False]
    _assert_same_run(runs / "c2", runs / "c1", atol=5e-5)


def test_checkpoint_of_two_processes_resumes_in_one(runs):
    assert _outcome(runs / "t2-crash")["outcome"] == "crashed"
    assert len((runs / "t2-crash" / "metrics.jsonl").read_text().splitlines()) == 2
    assert _outcome(runs / "t2-crash-resumed-in-1") == {"outcome": "done", "world_size": 1, "feature_cache_misses": 0}
    _assert_same_run(runs / "t2-crash-resumed-in-1", runs / "t1")


def test_checkpoint_of_one_process_resumes_in_two(runs):
    assert _outcome(runs / "t1-crash-resumed-in-2")["world_size"] == 2
    _assert_same_run(runs / "t1-crash-resumed-in-2", runs / "t1")


def test_shards_cover_every_item_once_and_reassemble_in_order():
    n, world = 11, 3
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(s) for s in shards] == [4, 4, 3]
    x = torch.arange(n * 2).reshape(n, 2)
    assert gather_shards((x,), n)[0].equal(x)  # one process: unchanged
    assert [t.item() for t in all_reduce_sum(3, 4.5)] == [3.0, 4.5]


def test_cli_train_under_torchrun_prints_and_writes_once(tmp_path):
    import yaml
    from conftest import copy_sample
    from ddp_worker import CLASSES

    copy_sample(tmp_path / "photos", CLASSES, per_class=6)
    config = {"backbone": {"name": "test_resnet", "pretrained": False, "data_config": {"input_size": [3, 64, 64]}},
              "data": {"root": str(tmp_path / "photos"), "val_fraction": 0.34},
              "train": {"epochs": 2, "batch_size": 2, "progress": False, "precision": "fp32"},
              "output_dir": str(tmp_path / "run")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tlkit", "train", "--config", str(tmp_path / "run.yaml")]
    # Own process group: a hang is killed whole (torchrun's workers included), not left running.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"tlkit train under torchrun hung: {err[-3000:]}")
    proc.stdout, proc.stderr = out, err
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints the final metrics
    assert lines[0]["n"] == 6  # 2 of 6 photos per class in validation, counted once over both ranks
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "confusion_matrix.png").is_file()


@pytest.mark.parametrize("option, message", [
    ({"sync_batchnorm": True}, "sync_batchnorm needs CUDA: torch's SyncBatchNorm has no cpu kernel"),
    ({"compile": True}, "compile=True is not supported under DDP"),
])
def test_ddp_only_options_fail_before_training_and_write_nothing(tmp_path, option, message):
    classes = ["cardboard", "glass", "metal"]
    train = ImageFolderDataset(copy_sample(tmp_path / "train", classes, per_class=2))
    tuner = tiny_tuner(classes, output_dir=tmp_path / "run", **option)
    before = {k: v.clone() for k, v in tuner.model.state_dict().items()}
    tuner.dist = DistributedContext(rank=0, world_size=2, local_rank=0, backend="gloo")  # as under torchrun
    with pytest.raises(ValueError, match=re.escape(message)):
        tuner.fit(train)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in tuner.model.modules())
    assert all(torch.equal(before[k], v) for k, v in tuner.model.state_dict().items())
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
