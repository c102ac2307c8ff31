"""Runs for test_distributed.py (not a test module), in one process or under torchrun.

Usage: ``torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py PLAN.json``, or
``run_plan(plan)`` in-process for the one-process side. The plan is a list of runs, each a
dict:

- ``scenario``: ``"tensors"`` (deterministic tensor data, BatchNorm frozen, head only for
  epoch 0 then the last two stages from epoch 1) or ``"cached"`` (real photos, a linear probe
  from cached features for epoch 0, then the last stage unfreezes at epoch 1);
- ``dir``: the run folder; ``batch_size``: per process; ``epochs``;
- ``crash_after``: stop with `SimulatedCrash` when epoch ``crash_after`` starts (a kill
  between epochs, on every rank at the same step);
- ``resume``: ``fit(..., resume=True)`` in ``dir``.

Rank 0 writes ``dir/outcome.json`` (``"done"``, ``"crashed"`` or an error message).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from conftest import copy_sample, tiny_tuner  # noqa: E402

from tlkit import FreezePolicy, ImageFolderDataset
from tlkit.distributed import destroy_distributed  # noqa: E402

CLASSES = ["cardboard", "glass", "metal"]


class SimulatedCrash(Exception):
    pass


class CrashingDataset(torch.utils.data.Dataset):
    """A dataset that raises after ``limit`` items were read (``None``: never)."""

    def __init__(self, base, limit: int | None) -> None:
        self.base, self.limit, self.reads = base, limit, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        if self.limit is not None and self.reads >= self.limit:
            raise SimulatedCrash
        self.reads += 1
        return self.base[i]


def tensor_data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 64, 64, generator=g), torch.arange(n) % len(CLASSES))


def run(spec: dict) -> str:
    out = Path(spec["dir"])
    b = spec["batch_size"]
    if spec["scenario"] == "tensors":
        train, val = tensor_data(52, 0), tensor_data(21, 1)
        policy = FreezePolicy.linear_probe(batchnorm="frozen").then(1, depth=-3, layer_decay=0.5)
        extra: dict = {}
    else:
        data = Path(spec["data"])
        train = ImageFolderDataset(data / "train", classes=CLASSES)
        val = ImageFolderDataset(data / "val", classes=CLASSES)
        policy = FreezePolicy.linear_probe(batchnorm="frozen").then(1, depth=-2)
        extra = {"feature_cache": True}
    tuner = tiny_tuner(CLASSES, output_dir=out, policy=policy, epochs=spec["epochs"], batch_size=b,
                       lr=5e-3, weight_decay=0.01, **extra)
    if spec["scenario"] == "cached":
        tuner.train_transform = tuner.eval_transform  # deterministic full epochs too
    world = tuner.dist.world_size if tuner.dist else 1  # the tuner joined torchrun's process group
    per_rank_epoch = (len(train) // world) // b * b
    fit_train = train
    if spec.get("crash_after") is not None:
        if spec["scenario"] == "cached":
            raise ValueError("crash_after is for the tensors scenario")
        fit_train = CrashingDataset(train, spec["crash_after"] * per_rank_epoch)
    try:
        tuner.fit(fit_train, val, resume=bool(spec.get("resume")))
        outcome = "done"
    except SimulatedCrash:
        outcome = "crashed"
    if tuner.is_main:
        (out / "outcome.json").write_text(json.dumps({"outcome": outcome, "world_size": world,
                                                      "feature_cache_misses": tuner.feature_cache.misses}))
    return outcome


def run_plan(plan: list[dict]) -> list[str]:
    return [run(spec) for spec in plan]


def prepare_photos(root: Path) -> Path:
    copy_sample(root / "train", CLASSES, per_class=5)
    copy_sample(root / "val", CLASSES, per_class=3, offset=5)
    return root


if __name__ == "__main__":
    try:
        run_plan(json.loads(Path(sys.argv[1]).read_text()))
    finally:
        destroy_distributed()
