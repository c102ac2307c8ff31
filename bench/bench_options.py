"""Each fast path of tlkit on its own: speed and accuracy with it on and off, in one process.

    python bench/bench_options.py                 # 500 TrashNet photos (400 train / 100 val)
    python bench/bench_options.py --limit 200 --ft-epochs 1

Rows (MobileNetV2, offline ImageNet weights, BatchNorm frozen since it is folded into them):

* fine-tune: float32 or bfloat16 autocast, NCHW or channels_last, subnormals flushed or not,
  DataLoader workers 0 or 2, ``torch.compile`` on or off. Training images/s (the last epoch, so
  compilation is excluded and reported apart) and val top-1 after ``--ft-epochs`` epochs.
* JPEG draft decoding for eval/predict: the val photos upscaled 4x to camera size
  (1536 x 2048, JPEG quality 92, in a temporary folder) and predicted with ``jpeg_draft`` on
  and off by one linear-probe model: images/s, top-1, and how many predictions agree.

Nothing is asserted; the numbers belong to the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transfer import REPO, model_and_tuner, subset  # noqa: E402

from tlkit import FreezePolicy, ImageFolderDataset, stratified_split  # noqa: E402

VARIANTS = {  # name: TrainConfig changes from tlkit's defaults
    "fp32, NCHW (plain numerics)": {"precision": "fp32", "channels_last": False},
    "fp32, channels_last": {"precision": "fp32", "channels_last": True},
    "bf16, NCHW": {"precision": "auto", "channels_last": False},
    "bf16, channels_last (tlkit default)": {},
    "bf16, channels_last, subnormals kept": {"flush_denormal": False},
    "bf16, channels_last, 2 DataLoader workers": {"num_workers": 2},
    "bf16, channels_last, torch.compile": {"compile": True},
}


def finetune_row(classes, train, val, epochs: int, changes: dict) -> dict:
    tuner = model_and_tuner(classes, FreezePolicy.full_finetune(batchnorm="frozen"), epochs, fast=True,
                            lr=1e-4, **changes)
    t0 = time.perf_counter()
    hist = tuner.fit(train, val)
    wall = time.perf_counter() - t0
    last = hist[-1]
    return {"img_s": last["images_per_s"], "first_epoch_s": hist[0]["seconds"], "last_epoch_s": last["seconds"],
            "wall_s": wall, "top1": last["top1"]}


def upscale(val: ImageFolderDataset, dst: Path, factor: int = 4) -> ImageFolderDataset:
    for path, label in val.samples:
        out = dst / val.classes[label] / (path.stem + ".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as im:
            im.convert("RGB").resize((im.width * factor, im.height * factor), Image.BICUBIC).save(out, quality=92)
    return ImageFolderDataset(dst, classes=val.classes)


def draft_rows(classes, train, val, tmp: Path) -> dict:
    probe = model_and_tuner(classes, FreezePolicy.linear_probe(), 15, fast=True, feature_cache=True)
    probe.fit(train)
    big = upscale(val, tmp)
    paths = [p for p, _ in big.samples]
    out = {}
    preds = {}
    for draft in (False, True):
        probe.config = probe.config.model_copy(update={"jpeg_draft": draft})
        probe.draft_size = 256 if draft else None  # what FineTuner derives from the data config
        probe.predict(paths[:8])  # warm-up
        t0 = time.perf_counter()
        p = probe.predict(paths, batch_size=64)
        secs = time.perf_counter() - t0
        preds[draft] = [q.index for q in p]
        top1 = sum(q == y for q, (_, y) in zip(preds[draft], big.samples)) / len(paths)
        out[f"draft={draft}"] = {"img_s": len(paths) / secs, "top1": top1}
    out["agreement"] = sum(a == b for a, b in zip(preds[False], preds[True])) / len(paths)
    with Image.open(paths[0]) as im:
        out["image_size"] = list(im.size)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "trashnet")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--only", nargs="*", help="run only these variant names (substring match) or 'draft'")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    data = subset(ImageFolderDataset(a.data), a.limit)
    train, val = stratified_split(data, 0.2, 0)
    print(f"{len(train)} train / {len(val)} val images; torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}", flush=True)
    rows: dict[str, dict] = {}
    wanted = lambda name: not a.only or any(o in name for o in a.only)  # noqa: E731
    for name, changes in VARIANTS.items():
        if wanted(name):
            rows[name] = finetune_row(data.classes, train, val, a.ft_epochs, changes)
            print(name, json.dumps(rows[name]), flush=True)
    if wanted("draft"):
        with tempfile.TemporaryDirectory() as tmp:
            rows["jpeg draft"] = draft_rows(data.classes, train, val, Path(tmp))
        print("jpeg draft", json.dumps(rows["jpeg draft"]), flush=True)

    base = rows.get("fp32, NCHW (plain numerics)")
    print(f"\n| fine-tune, {a.ft_epochs} epochs | img/s | vs fp32 NCHW | first epoch (s) | val top-1 |\n|---|---|---|---|---|")
    for name in VARIANTS:
        if name in rows:
            r = rows[name]
            ratio = f"{r['img_s'] / base['img_s']:.2f}x" if base else ""
            print(f"| {name} | {r['img_s']:.1f} | {ratio} | {r['first_epoch_s']:.1f} | {r['top1']:.3f} |")
    if "jpeg draft" in rows:
        r = rows["jpeg draft"]
        w, h = r["image_size"]
        print(f"\n| predict, {w} x {h} JPEGs | img/s | val top-1 |\n|---|---|---|")
        for d in (False, True):
            print(f"| jpeg_draft={d} | {r[f'draft={d}']['img_s']:.1f} | {r[f'draft={d}']['top1']:.3f} |")
        print(f"| predictions that agree | {r['agreement']:.3f} | |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
