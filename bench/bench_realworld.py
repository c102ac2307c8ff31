"""Robustness bench: TrashNet held-out photos and real phone photos, for every recipe and lever.

    python bench/bench_realworld.py                                   # every row
    python bench/bench_realworld.py --rows probe probe-bg --reuse      # some rows, keep measured ones
    python bench/bench_realworld.py --rows probe --limit 20 --epochs 1 # smoke run

TrashNet (``../shared/data/trashnet``) is split once, as `bench_peers.py` splits it (stratified,
20% of each class held out, split seed 0): every row trains on the pool and is scored on the
held-out photos **and** on ``../shared/data/realworld-dev`` (75 phone photos of garbage on a stone
floor). realworld-dev is for measuring only: no row trains, selects or tunes on it. Rows train on
90% of the pool; the other 10% (stratified) only fits the temperature and the reject threshold
(`tlkit.calibration`) at each epoch; the final model is scored, with its last epoch's calibration.

Each row runs in its own process (one heavy job at a time on a small CPU) and writes
``OUT/rows/<row>.json``: softmax probabilities for both sets, training seconds, settings. The
table gives top-1 with its 95% Wilson interval, macro-F1, per-class recall, expected calibration
error (15 bins) and the accuracy at 80% coverage (the most confident 80% of photos), then the
peers of `bench_peers.py` (fastai, Lightning, timm's train.py; rows ``fastai-lite0``,
``lightning-lite0``, ``timm-lite0``, run when named in ``--rows``) scored the same way on their
hard predictions. ``ens-probes`` (no training of its own) averages the probabilities of the
``probe`` and ``lite0-probe`` rows. Nothing is asserted: the numbers belong to
the machine, and one realworld-dev photo is 1.3 points.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_peers import make_split, score  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"

# Row name -> (backbone, recipe, RunConfig overrides). "-bg": the background swap lever.
BG = ["data.augment.background=0.8"]
ROWS: dict[str, tuple[str, str, list[str]]] = {
    "probe": ("mnv2", "linear-probe", []),
    "probe-bg": ("mnv2", "linear-probe", [*BG, "train.feature_views=4"]),
    "finetune-strong": ("mnv2", "finetune-strong", []),
    "finetune-strong-bg": ("mnv2", "finetune-strong", BG),
    "lp-ft": ("mnv2", "lp-ft", []),
    "lp-ft-wise": ("mnv2", "lp-ft", ["train.wise_ft=0.5"]),
    "lp-ft-bg-wise": ("mnv2", "lp-ft", [*BG, "train.wise_ft=0.5"]),
    "lite0-probe": ("lite0", "linear-probe", []),
    "lite0-finetune-strong": ("lite0", "finetune-strong", []),
    "lite0-lp-ft-bg-wise": ("lite0", "lp-ft", [*BG, "train.wise_ft=0.5"]),
}
# The peers of bench_peers.py, trained as there (the whole pool, their own recipes) and scored on
# the same photos. They give hard predictions only: no ECE, no coverage curve.
PEERS = {"fastai-lite0": "row_fastai", "lightning-lite0": "row_lightning", "timm-lite0": "row_timm"}
# Ensembles of measured rows: their probabilities averaged (no training of their own; the time is the sum).
ENSEMBLES = {"ens-probes": ("probe", "lite0-probe")}
VAL_FRACTION = 0.1  # of the pool: chooses nothing, fits the temperature and the reject threshold


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def ece(probs: list[list[float]], true: list[int], bins: int = 15) -> float:
    """Expected calibration error: |accuracy - confidence| averaged over equal-width confidence bins."""
    conf = [max(p) for p in probs]
    right = [int(max(range(len(p)), key=p.__getitem__) == t) for p, t in zip(probs, true)]
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(conf) if lo < c <= hi or (b == 0 and c == 0)]
        if idx:
            total += len(idx) / len(conf) * abs(sum(right[i] for i in idx) / len(idx) - sum(conf[i] for i in idx) / len(idx))
    return total


def accuracy_at_coverage(probs: list[list[float]], true: list[int], coverage: float = 0.8) -> float:
    """Top-1 on the ``coverage`` share of photos the model is most confident about."""
    order = sorted(range(len(probs)), key=lambda i: -max(probs[i]))[: max(1, round(coverage * len(probs)))]
    return sum(int(max(range(len(probs[i])), key=probs[i].__getitem__) == true[i]) for i in order) / len(order)


def scored(probs: list[list[float]], true: list[int], classes: list[str]) -> dict:
    pred = [max(range(len(p)), key=p.__getitem__) for p in probs]
    m = score(pred, true, classes)
    k = sum(int(a == b) for a, b in zip(pred, true))
    return {**m, "ci": wilson(k, len(true)), "ece": ece(probs, true), "acc80": accuracy_at_coverage(probs, true)}


# ---------------------------------------------------------------- rows (each in its own process)

def backbone_config(which: str):
    from bench_peers import backbone_config as peers_backbone

    return peers_backbone(which)


def run_peer(row: str, out: Path, epochs: int | None, timm_repo: Path | None) -> dict:
    """A peer of bench_peers.py: one training, its predictions on TrashNet's held-out photos and every extra set."""
    import bench_peers

    split = json.loads((out / "split.json").read_text())
    sets = {"trashnet": split["test"], **split["extra"]}
    joined = {**split, "test": [item for items in sets.values() for item in items]}
    work = out / "work" / row
    work.mkdir(parents=True, exist_ok=True)
    fn = getattr(bench_peers, PEERS[row])
    res = fn(joined, work, epochs or 15, timm_repo) if row == "timm-lite0" else fn(joined, work, epochs or 15)
    n = len(split["classes"])
    one_hot = [[1.0 if c == y else 0.0 for c in range(n)] for y in res["pred"]]
    result = {"train_seconds": res["train_seconds"], "settings": res["settings"], "hard": True, "sets": {}}
    start = 0
    for name, items in sets.items():
        result["sets"][name] = one_hot[start:start + len(items)]
        start += len(items)
    return result


def run_row(row: str, out: Path, epochs: int | None) -> dict:
    from tlkit import FineTuner, apply_recipe
    from tlkit.config import DatasetConfig, RunConfig
    from tlkit.data import ImageFolderDataset

    split = json.loads((out / "split.json").read_text())
    which, recipe, overrides = ROWS[row]
    from tlkit.data import stratified_split

    full = ImageFolderDataset(split["data"], classes=split["classes"])
    index = {str(p): i for i, (p, _) in enumerate(full.samples)}
    pool = full.subset([index[p] for p, _ in split["train"]])
    train, val = stratified_split(pool, VAL_FRACTION, 0)
    config = apply_recipe(RunConfig(backbone=backbone_config(which), data=DatasetConfig(root=split["data"]),
                                    output_dir=out / "work" / row), recipe)
    config = config.with_overrides([*overrides, "train.progress=epochs"])
    if epochs:
        config = config.with_overrides([f"train.epochs={epochs}", f"train.warmup_epochs={min(1, epochs)}"])
    tuner = FineTuner.from_config(config, full.classes)
    t0 = time.perf_counter()
    # The final model is scored; val only fits the temperature and reject threshold (tlkit.calibration).
    tuner.fit(train, val, overwrite=True)
    seconds = time.perf_counter() - t0
    result = {"train_seconds": seconds, "settings": f"{recipe} {' '.join(overrides)}".strip(), "sets": {}}
    for name, items in (("trashnet", split["test"]), *((k, v) for k, v in split["extra"].items())):
        preds = tuner.predict([p for p, _ in items])
        result["sets"][name] = [[p.probabilities[c] for c in full.classes] for p in preds]
    return result


# ---------------------------------------------------------------- table

def _extra_items(folder: Path, classes: list[str]) -> list[list]:
    from tlkit.data import ImageFolderDataset

    ds = ImageFolderDataset(folder, classes=classes)
    return [[str(p), int(y)] for p, y in ds.samples]


def load_row(out: Path, row: str) -> dict | None:
    """A measured row's result, or an ensemble's (mean probabilities of its members), or None."""
    if row in ENSEMBLES:
        members = [load_row(out, m) for m in ENSEMBLES[row]]
        if any(m is None for m in members):
            return None
        sets = {name: [[sum(col) / len(members) for col in zip(*rows, strict=True)]
                       for rows in zip(*(m["sets"][name] for m in members), strict=True)]
                for name in members[0]["sets"]}
        return {"train_seconds": sum(m["train_seconds"] for m in members), "sets": sets,
                "settings": "mean probabilities of " + " + ".join(ENSEMBLES[row])}
    f = out / "rows" / f"{row}.json"
    return json.loads(f.read_text()) if f.exists() else None


def table(out: Path, rows: list[str]) -> str:
    split = json.loads((out / "split.json").read_text())
    sets = {"trashnet": split["test"], **split["extra"]}
    lines = [f"TrashNet held-out: {len(split['test'])} photos (split seed {split['split_seed']}); "
             + "; ".join(f"{k}: {len(v)} photos" for k, v in split["extra"].items()), "",
             "| row | set | top-1 (95% CI) | macro-F1 | ECE | top-1 at 80% coverage | recall per class | train time |",
             "|---|---|---|---|---|---|---|---|"]
    results = {row: res for row in rows if (res := load_row(out, row)) is not None}
    for row, res in results.items():
        for name, items in sets.items():
            m = scored(res["sets"][name], [y for _, y in items], split["classes"])
            recall = " ".join(f"{c[:4]} {v:.2f}" for c, v in m["recall"].items())
            ece_cell, cover_cell = ("-", "-") if res.get("hard") else (f"{m['ece']:.3f}", f"{100 * m['acc80']:.1f}%")
            lines.append(f"| {row} | {name} | {100 * m['top1']:.1f}% ({100 * m['ci'][0]:.0f}-{100 * m['ci'][1]:.0f}) | "
                         f"{m['macro_f1']:.3f} | {ece_cell} | {cover_cell} | {recall} | "
                         f"{res['train_seconds']:.0f} s |")
    lines += ["", "settings:"] + [f"- {r}: {res['settings']}" for r, res in results.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=SHARED / "trashnet")
    p.add_argument("--realworld", type=Path, default=SHARED / "realworld-dev")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=[*ROWS, *PEERS],
                   help="default: every tlkit row; add the peers by name (fastai-lite0 lightning-lite0 timm-lite0)")
    p.add_argument("--timm-repo", type=Path, help="a pytorch-image-models checkout (for timm-lite0's train.py)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-realworld")
    p.add_argument("--epochs", type=int, help="override every row's epoch count (smoke runs)")
    p.add_argument("--limit", type=int, help="use only the first N TrashNet photos of each class (smoke runs)")
    p.add_argument("--reuse", action="store_true", help="keep rows already measured in OUT/rows")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    if args.child:
        result = (run_peer(args.child, args.out, args.epochs, args.timm_repo) if args.child in PEERS
                  else run_row(args.child, args.out, args.epochs))
        (args.out / "rows").mkdir(exist_ok=True)
        (args.out / "rows" / f"{args.child}.json").write_text(json.dumps(result))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    split = make_split(args.data, 0.2, 0, args.limit)
    split["extra"] = {"realworld-dev": _extra_items(args.realworld, split["classes"])}
    (args.out / "split.json").write_text(json.dumps(split))
    for row in args.rows:
        if args.reuse and (args.out / "rows" / f"{row}.json").exists():
            continue
        cmd = [sys.executable, __file__, "--child", row, "--out", str(args.out)]
        cmd += ["--epochs", str(args.epochs)] if args.epochs else []
        cmd += ["--timm-repo", str(args.timm_repo)] if args.timm_repo else []
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        print(f"{row}: {'done' if done.returncode == 0 else f'FAILED (exit {done.returncode})'} "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
    report = table(args.out, [*ROWS, *ENSEMBLES, *PEERS])
    (args.out / "table.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
