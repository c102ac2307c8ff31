"""GPU throughput: a tlkit fine-tune against a plain PyTorch loop and timm's train.py, same GPU, same model.

    python bench/bench_gpu.py                                   # on a GPU machine: the full table (< 8 min on an H100)
    python bench/bench_gpu.py --timm-repo ~/src/pytorch-image-models   # adds timm's train.py rows
    python bench/bench_gpu.py --smoke                           # CPU-safe parts, tiny, seconds (CI runs it)

For each model (``convnext_tiny``, ``efficientnet_b0``; random init, 224 px, every parameter
trains) and each input source, images/s over timed steps after warm-up steps:

* ``synthetic``: random tensors already on the device (compute only: the ceiling);
* ``jpeg``: real JPEGs decoded on the fly by DataLoader workers (``--data``, default
  ``../shared/data/trashnet``), resized and augmented as in training: does decoding starve the GPU?

Rows: ``tlkit`` (`FineTuner.fit`: bf16 autocast, channels_last, its loaders), ``tlkit-compile``
(``train.compile``), ``plain`` (a hand-written loop: AdamW, bf16 autocast, channels_last,
``pin_memory``, ``non_blocking``), ``plain-fp32``, and ``timm`` (timm's ``train.py --amp
--amp-dtype bfloat16 --channels-last``, its own reported rate) with ``--timm-repo``. Each row
also reports peak GPU memory and the GPU's utilisation (nvidia-smi's, sampled while it runs);
with several GPUs, the ``tlkit`` row again under ``torchrun`` for the scaling per GPU. Ratios are
to the ``plain`` row of the same model and source, on the same GPU in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Utilisation:
    """Samples ``nvidia-smi``'s GPU utilisation every 0.2 s while it runs (``None`` without one)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=2)
                self.samples.append(float(out.stdout.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            time.sleep(0.2)

    def __enter__(self) -> Utilisation:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=3)

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def synthetic_data(n: int, size: int, classes: int = 10):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, size, size, generator=g),
                                          torch.randint(0, classes, (n,), generator=g))


def row_tlkit(model_name: str, source: str, args, compile_: bool = False) -> dict:
    """`FineTuner.fit` for two epochs of ``steps * batch`` images: the second's images/s (loader included)."""
    import timm

    from tlkit import FineTuner, HeadReplacer, ImageFolderDataset, TrainConfig

    n = args.steps * args.batch
    folder = ImageFolderDataset(args.data) if source == "jpeg" else None
    data = synthetic_data(n, args.size) if source == "synthetic" else folder.subset([i % len(folder) for i in range(n)])
    classes = [str(i) for i in range(10)] if source == "synthetic" else data.classes
    model = HeadReplacer(len(classes)).apply(timm.create_model(model_name, pretrained=False))
    # Two epochs, the second timed: the first pays for compilation, cudnn autotuning and worker start-up
    # (the plain loop's warm-up steps).
    config = TrainConfig(epochs=2, batch_size=args.batch, warmup_epochs=0, progress=False, compile=compile_,
                         num_workers=0 if source == "synthetic" else args.workers, device="auto")
    tuner = FineTuner(model, classes, config=config, data_config={"input_size": [3, args.size, args.size]})
    _reset_peak()
    with Utilisation() as util:
        history = tuner.fit(data)
    return {"images_per_s": history[-1]["images_per_s"], "peak_mb": _peak_mb(), "gpu_util": util.mean,
            "settings": f"FineTuner.fit, {tuner.amp_dtype}, channels_last {tuner.channels_last}, "
                        f"{config.num_workers} workers, compile {compile_}"}


def row_plain(model_name: str, source: str, args, fp32: bool = False) -> dict:
    """A hand-written loop: the reference a user writes from PyTorch's docs."""
    import timm
    import torch

    device = _device()
    model = timm.create_model(model_name, pretrained=False, num_classes=10).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if source == "synthetic":
        x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.batch,), device=device)
        batches = ((x, y) for _ in range(args.warmup + args.steps))
    else:
        from timm.data import create_transform

        from tlkit import ImageFolderDataset

        ds = ImageFolderDataset(args.data, transform=create_transform(args.size, is_training=True))
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                             pin_memory=device.type == "cuda", drop_last=True,
                                             persistent_workers=args.workers > 0)
        batches = (b for _ in range(100) for b in loader)
    dtype = None if fp32 else torch.bfloat16
    _reset_peak()
    seen, t0 = 0, None
    with Utilisation() as util:
        for i, (x, y) in enumerate(batches):
            if i == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, seen = time.perf_counter(), 0
            if i >= args.warmup + args.steps:
                break
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
    return {"images_per_s": seen / (time.perf_counter() - t0), "peak_mb": _peak_mb(), "gpu_util": util.mean,
            "settings": f"plain loop, {'fp32' if fp32 else 'bf16 autocast'}, channels_last, {args.workers} workers"}


def row_timm(model_name: str, source: str, args) -> dict:
    """timm's train.py on the same JPEGs (its logged rate of the last interval)."""
    if source != "jpeg":
        return {"skipped": "train.py reads image folders only"}
    cmd = [sys.executable, str(args.timm_repo / "train.py"), "--data-dir", str(args.timm_data), "--model", model_name,
           "--num-classes", "6", "--epochs", "1", "-b", str(args.batch), "--amp", "--amp-dtype", "bfloat16",
           "--channels-last", "--workers", str(args.workers), "--log-interval", "10", "--output", "/tmp/bench-gpu-timm",
           "--input-size", "3", str(args.size), str(args.size)]
    with Utilisation() as util:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=args.timm_repo)
    rates = [float(r) for r in re.findall(r"([0-9.]+)/s", out.stdout + out.stderr)]
    return {"images_per_s": rates[-1] if rates else None, "peak_mb": None, "gpu_util": util.mean,
            "settings": "train.py --amp --amp-dtype bfloat16 --channels-last (its last logged rate)"}


def row_ddp(model_name: str, source: str, args) -> dict:
    """The ``tlkit`` row under ``torchrun`` on every GPU (rank 0's images/s, times the processes)."""
    import torch

    n = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", __file__, "--child-ddp", model_name,
           source, "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
           "--workers", str(args.workers), "--data", str(args.data)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    found = re.findall(r"^DDP (\{.*\})$", out.stdout, flags=re.M)
    result = json.loads(found[-1]) if found else {"images_per_s": None, "error": out.stderr[-300:]}
    if result.get("images_per_s"):
        result["images_per_s"] *= n  # every process trains its own batch_size per step
    return {**result, "settings": f"tlkit under torchrun, {n} GPUs, per-GPU batch {args.batch}"}


def _timm_data(args) -> Path:
    """train.py wants train/ (and validation/) folders: links to the JPEGs used by every row."""
    out = Path("/tmp/bench-gpu-data")
    for part in ("train", "validation"):
        for c in sorted(p for p in Path(args.data).iterdir() if p.is_dir()):
            (out / part / c.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(c.iterdir())[: 64 if part == "validation" else None]:
                link = out / part / c.name / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return out


def main(argv: list[str] | None = None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["convnext_tiny", "efficientnet_b0"])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "trashnet")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=30, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--timm-repo", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-gpu.json")
    p.add_argument("--smoke", action="store_true", help="CPU-safe and tiny: test_resnet, 2 steps of 4 images at 64 px")
    p.add_argument("--child-ddp", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_ddp:  # one torchrun process of row_ddp
        result = row_tlkit(*args.child_ddp, args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("DDP " + json.dumps(result), flush=True)
        return
    if args.smoke:
        args.models, args.batch, args.size, args.steps, args.warmup, args.workers = ["test_resnet"], 4, 64, 2, 1, 0
    device = _device()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (no GPU)"
    if args.timm_repo:
        args.timm_data = _timm_data(args)
    rows = []
    for model in args.models:
        for source in ("synthetic", "jpeg"):
            plan = [("plain", lambda m=model, s=source: row_plain(m, s, args)),
                    ("plain-fp32", lambda m=model, s=source: row_plain(m, s, args, fp32=True)),
                    ("tlkit", lambda m=model, s=source: row_tlkit(m, s, args)),
                    ("tlkit-compile", lambda m=model, s=source: row_tlkit(m, s, args, compile_=True))]
            if args.smoke:
                plan = [plan[0], plan[2]]
            if args.timm_repo:
                plan.append(("timm", lambda m=model, s=source: row_timm(m, s, args)))
            if torch.cuda.device_count() > 1:
                plan.append(("tlkit-ddp", lambda m=model, s=source: row_ddp(m, s, args)))
            for row, run in plan:
                result = {"model": model, "source": source, "row": row, **run()}
                rows.append(result)
                print(json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    print(f"\n{name}\n")
    print("| model | source | row | images/s | vs plain | peak MB | GPU busy |\n|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((x for x in rows if x["model"] == r["model"] and x["source"] == r["source"] and x["row"] == "plain"), None)
        ips, base = r.get("images_per_s"), (ref or {}).get("images_per_s")
        ratio = f"{ips / base:.2f}x" if ips and base else ""
        util = f"{r['gpu_util']:.0f}%" if r.get("gpu_util") is not None else ""
        peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") else ""
        print(f"| {r['model']} | {r['source']} | {r['row']} | {ips or 0:.1f} | {ratio} | {peak} | {util} |")


if __name__ == "__main__":
    main()
