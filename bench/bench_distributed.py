"""Scaling of tlkit under torchrun: one process against N DDP processes, same global batch, same run.

    python bench/bench_distributed.py                     # 1 vs 2 processes on this machine
    python bench/bench_distributed.py --nproc 2 4 --images 120

Each configuration runs in fresh processes (``torchrun --standalone`` for N > 1; one process is
given all ``--threads`` cores, N processes split them, as torchrun's ``OMP_NUM_THREADS``
does). Two workloads on the offline MobileNetV2 file and the first ``--images`` photos of each
class:

* ``finetune``: one epoch of the partial fine-tune (last four stages and head, BatchNorm frozen),
  global batch ``--batch`` (``--batch / N`` per process); images/s over the epoch;
* ``linear-probe``: one epoch of the cached-feature linear probe; its time is the sharded feature
  extraction plus the gather plus the head epoch.

Prints one table row per workload and process count, with the ratio to one process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MOBILENET = REPO / "examples" / "garbage" / "weights" / "mobilenetv2_100_tf_qat_dequant.safetensors"
CLASSES = ["cardboard", "glass", "metal", "paper", "plastic", "trash"]


def subset(data: Path, per_class: int, out: Path) -> Path:
    """``out/<class>/`` with symlinks to the first ``per_class`` photos of each class."""
    for c in CLASSES:
        (out / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((data / c).iterdir())[:per_class]:
            (out / c / f.name).symlink_to(f.resolve())
    return out


def worker(args: argparse.Namespace) -> None:
    import torch

    from tlkit import BackboneConfig, FineTuner, FreezePolicy, ImageFolderDataset, RunConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    backbone = BackboneConfig(name="mobilenetv2_100", weights=MOBILENET)  # padding and mean/std: resolved by tlkit
    if args.workload == "finetune":
        policy = FreezePolicy(depth=-5, layer_decay=0.6, batchnorm="frozen")
        train_cfg = {"epochs": 1, "warmup_epochs": 0, "lr": 1e-4}
    else:
        policy = FreezePolicy.linear_probe(batchnorm="frozen")
        train_cfg = {"epochs": 1, "warmup_epochs": 0, "feature_cache": True}
    config = RunConfig(backbone=backbone, freeze=policy)
    config = config.model_copy(update={"train": config.train.model_copy(update={
        **train_cfg, "batch_size": args.batch // world, "progress": False})})
    train = ImageFolderDataset(args.subset, classes=CLASSES)
    tuner = FineTuner.from_config(config, train.classes)
    t0 = time.perf_counter()
    tuner.fit(train)
    wall = time.perf_counter() - t0
    if tuner.is_main:
        print(json.dumps({"workload": args.workload, "processes": world, "threads": torch.get_num_threads(),
                          "images": len(train), "seconds": round(wall, 2),
                          "images_per_s": round(len(train) / wall, 2)}))


def launch(args: argparse.Namespace, workload: str, nproc: int, subset_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(max(args.threads // nproc, 1))
    common = [str(Path(__file__).resolve()), "--worker", "--workload", workload, "--subset", str(subset_dir),
              "--batch", str(args.batch)]
    if nproc == 1:
        cmd = [sys.executable, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *common]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{workload} with {nproc} process(es) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "trashnet")
    parser.add_argument("--images", type=int, default=40, help="photos per class (default 40: 240 in all)")
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    parser.add_argument("--nproc", type=int, nargs="+", default=[2], help="process counts to compare with 1")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores to share between processes")
    parser.add_argument("--workloads", nargs="+", default=["finetune", "linear-probe"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--subset", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        subset_dir = subset(args.data, args.images, Path(tmp) / "subset")
        print("| workload | processes | threads each | images | seconds | images/s | vs 1 process |")
        print("|---|---|---|---|---|---|---|")
        for workload in args.workloads:
            base = launch(args, workload, 1, subset_dir)
            for n in [1, *args.nproc]:
                r = base if n == 1 else launch(args, workload, n, subset_dir)
                print(f"| {workload} | {n} | {r['threads']} | {r['images']} | {r['seconds']} | {r['images_per_s']} "
                      f"| {r['images_per_s'] / base['images_per_s']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
