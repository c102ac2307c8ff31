"""Plain PyTorch loops against tlkit, in one process, on MobileNetV2 and real TrashNet photos.

    python bench/bench_transfer.py                       # full ../shared/data/trashnet
    python bench/bench_transfer.py --limit 500 --epochs 5

Prints a table of times, images/s, accuracies and ratios (tlkit over plain), and writes it as
JSON with --json. Nothing here is asserted: numbers depend on the machine.

"Plain" means what a careful user writes by hand with timm: float32, NCHW, the backbone
recomputed every epoch with ``requires_grad=False`` and in eval mode for a linear probe; for the
partial fine-tune, ``requires_grad=False`` on every parameter before the last two stages (so
autograd already skips the frozen prefix). A third, careless variant is measured too: the
optimizer gets only the last stages but nothing is marked frozen, so autograd keeps the
activations of every stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tlkit import (  # noqa: E402
    BackboneConfig,
    FineTuner,
    FreezePolicy,
    HeadReplacer,
    ImageFolderDataset,
    TrainConfig,
    create_backbone,
    resolve_backbone,
    stratified_split,
)

WEIGHTS = REPO / "examples" / "garbage" / "weights" / "mobilenetv2_100_tf_qat_dequant.safetensors"
BACKBONE = resolve_backbone(BackboneConfig(name="mobilenetv2_100", weights=WEIGHTS))  # pad_type, mean/std from the file


def subset(ds: ImageFolderDataset, n: int | None, seed: int = 0) -> ImageFolderDataset:
    if n is None or n >= len(ds):
        return ds
    return stratified_split(ds, 1 - n / len(ds), seed)[0]


def model_and_tuner(classes, policy, epochs, fast: bool, **train):
    torch.manual_seed(0)
    model = HeadReplacer(len(classes)).apply(create_backbone(BACKBONE))
    train = {"lr": 1e-3, **train}
    cfg = TrainConfig(**{"epochs": epochs, "batch_size": 32, "warmup_epochs": 0,
                         "progress": False, "precision": "auto" if fast else "fp32", "channels_last": fast, **train})
    return FineTuner(model, classes, policy=policy, config=cfg)


# -- plain loops --------------------------------------------------------------------------------
def plain_fit(model: nn.Module, params, train, val, epochs: int, transform, eval_transform, frozen_eval: bool,
              lr: float = 1e-3, bn_eval: bool = False):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(train.with_transform(transform), batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0), drop_last=True)
    steps = epochs * len(loader)
    seen, t0, step = 0, time.perf_counter(), 0
    for _ in range(epochs):
        model.train()
        if frozen_eval:
            model.eval()
            model.get_classifier().train()
        if bn_eval:  # the offline weights have BatchNorm folded in: keep it in eval mode
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        for x, y in loader:
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
            step += 1
    seconds = time.perf_counter() - t0
    return seconds, seen / seconds, plain_top1(model, val, eval_transform)


@torch.no_grad()
def plain_top1(model, data, transform) -> float:
    model.eval()
    loader = torch.utils.data.DataLoader(data.with_transform(transform), batch_size=64)
    right = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return right / len(data)


@torch.no_grad()
def plain_forward_pass(model, data, transform) -> float:
    model.eval()
    t0 = time.perf_counter()
    for x, _ in torch.utils.data.DataLoader(data.with_transform(transform), batch_size=64):
        model(x)
    return time.perf_counter() - t0


# -- peak memory, each in a fresh process -------------------------------------------------------
def _memory_child(mode: str, batch: int) -> None:
    torch.manual_seed(0)
    model = HeadReplacer(6).apply(create_backbone(BACKBONE))
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 6, (batch,))
    if mode == "plain":  # careful hand-rolled: the prefix is marked frozen, fp32, NCHW
        from tlkit.freeze import parameter_groups

        last = {n for g in parameter_groups(model)[-3:] for n in g.param_names}
        for n, prm in model.named_parameters():
            prm.requires_grad_(n in last)
        params = [p for p in model.parameters() if p.requires_grad]
        ctx = torch.autocast("cpu", enabled=False)
    elif mode == "tlkit":
        policy = FreezePolicy.freeze_to(-3, batchnorm="frozen")  # last two stages + head
        policy.apply(model)
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    else:  # "careless": nothing marked frozen, the optimizer just gets the last stages
        from tlkit.freeze import parameter_groups

        last = {n for g in parameter_groups(model)[-3:] for n in g.param_names}
        params = [p for n, p in model.named_parameters() if n in last]
        ctx = torch.autocast("cpu", enabled=False)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    saved = []

    def pack(t):  # bytes autograd keeps for backward (activations)
        saved.append(t.numel() * t.element_size())
        return t

    base = _reset_peak_rss()
    for _ in range(2):
        saved.clear()
        with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(json.dumps({"peak_delta_bytes": _peak_rss() - base, "saved_bytes": sum(saved)}))


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux: clear_refs 5) and return the current RSS, bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status("VmRSS")
    except OSError:  # not Linux: the lifetime peak (may already exceed what the steps need)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    try:
        return _proc_status("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(mode: str, batch: int = 32) -> dict[str, int]:
    """Bytes autograd keeps for backward in one step, and the growth of the peak RSS, in bytes."""
    out = subprocess.run([sys.executable, __file__, "--memory-child", mode, "--batch", str(batch)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- main ---------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "trashnet")
    p.add_argument("--limit", type=int, help="use a stratified subset of this many images")
    p.add_argument("--epochs", type=int, default=15, help="linear-probe epochs (fine-tune uses --ft-epochs)")
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--scaling", type=int, nargs="*", default=[250, 500, 1000, 2000])
    p.add_argument("--json", type=Path)
    p.add_argument("--memory-child")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rows", nargs="*", default=["lp", "ft", "memory", "predict", "camera", "scaling"],
                   help="which rows to run: lp ft memory predict camera scaling")
    a = p.parse_args()
    if a.memory_child:
        return _memory_child(a.memory_child, a.batch)

    full = ImageFolderDataset(a.data)
    data = subset(full, a.limit)
    train, val = stratified_split(data, 0.2, 0)
    classes = data.classes
    rows: dict[str, dict] = {}
    print(f"{len(train)} train / {len(val)} val images; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}", flush=True)


    if "lp" in a.rows:
        linear_probe_row(a, classes, train, val, rows)
    if "ft" in a.rows:
        finetune_row(a, classes, train, val, rows)
    if "memory" in a.rows:
        memory_row(rows)
    if "predict" in a.rows:
        rows["predict"] = predict_row(classes, [p for p, _ in val.samples], val)
        print(json.dumps(rows["predict"]), flush=True)
    if "camera" in a.rows:
        import tempfile

        from bench_options import upscale

        with tempfile.TemporaryDirectory() as tmp:
            big = upscale(val, Path(tmp))
            rows["predict camera-size"] = predict_row(classes, [p for p, _ in big.samples], big)
        print(json.dumps(rows["predict camera-size"]), flush=True)
    if "scaling" in a.rows:
        scaling_rows(a, classes, full, rows)
    print_table(a, rows)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


def linear_probe_row(a, classes, train, val, rows) -> None:
    probe = model_and_tuner(classes, FreezePolicy.linear_probe(), a.epochs, fast=True, feature_cache=True)
    t0 = time.perf_counter()
    probe.fit(train, val)
    tl_time = time.perf_counter() - t0
    tl_top1 = probe.evaluate(val).top1
    plain_model = model_and_tuner(classes, FreezePolicy.linear_probe(), 1, fast=False).model
    for n, prm in plain_model.named_parameters():
        prm.requires_grad_(n.startswith("classifier"))
    floor = plain_forward_pass(plain_model, train, probe.eval_transform)
    pl_time, _, pl_top1 = plain_fit(plain_model, plain_model.get_classifier().parameters(), train, val, a.epochs,
                                    probe.train_transform, probe.eval_transform, frozen_eval=True)
    rows["linear probe"] = {"plain_s": pl_time, "tlkit_s": tl_time, "speedup": pl_time / tl_time,
                            "floor_s": floor, "tlkit_over_floor": tl_time / floor,
                            "plain_top1": pl_top1, "tlkit_top1": tl_top1}
    print(json.dumps(rows["linear probe"]), flush=True)


def finetune_row(a, classes, train, val, rows) -> None:
    # BatchNorm is folded into these weights (see examples/garbage/weights/README.md), so both
    # sides keep it in eval mode with its affine parameters fixed; everything else trains.
    ft = model_and_tuner(classes, FreezePolicy.full_finetune(batchnorm="frozen"), a.ft_epochs, fast=True, lr=1e-4)
    hist = ft.fit(train, val)
    tl_ips = sum(h["images_per_s"] * h["seconds"] for h in hist) / sum(h["seconds"] for h in hist)
    plain_model = model_and_tuner(classes, FreezePolicy.full_finetune(), 1, fast=False).model
    bn = {n for m_name, m in plain_model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
          for n in (f"{m_name}.weight", f"{m_name}.bias")}
    for n, prm in plain_model.named_parameters():
        prm.requires_grad_(n not in bn)
    _, pl_ips, pl_top1 = plain_fit(plain_model, [p for p in plain_model.parameters() if p.requires_grad], train,
                                   val, a.ft_epochs, ft.train_transform, ft.eval_transform, frozen_eval=False,
                                   lr=1e-4, bn_eval=True)
    rows["full fine-tune"] = {"plain_img_s": pl_ips, "tlkit_img_s": tl_ips, "speedup": tl_ips / pl_ips,
                              "plain_top1": pl_top1, "tlkit_top1": hist[-1]["top1"]}
    print(json.dumps(rows["full fine-tune"]), flush=True)


def memory_row(rows) -> None:
    mem = {m: peak_memory(m) for m in ("careless", "plain", "tlkit")}
    rows["partial fine-tune memory"] = {f"{m}_{k}": v for m, d in mem.items() for k, v in d.items()}
    print(json.dumps(rows["partial fine-tune memory"]), flush=True)


def predict_row(classes, paths, data) -> dict:
    """Images/s of classifying files: tlkit's predict (its default batch size) against a plain
    fp32 DataLoader loop at its faster of batch 16 and 64."""
    tuner = model_and_tuner(classes, FreezePolicy.linear_probe(), 1, fast=True)
    tuner.predict(paths[:32])  # warm-up (oneDNN primitive creation)
    t0 = time.perf_counter()
    tuner.predict(paths)
    tl_pred = len(paths) / (time.perf_counter() - t0)
    pl_model = model_and_tuner(classes, FreezePolicy.linear_probe(), 1, fast=False).model.eval()
    plain = {}
    for batch in (16, 64):
        with torch.no_grad():
            pl_model(torch.randn(batch, 3, 224, 224))
        t0 = time.perf_counter()
        with torch.no_grad():
            for x, _ in torch.utils.data.DataLoader(data.with_transform(tuner.eval_transform), batch_size=batch):
                pl_model(x).softmax(1)
        plain[batch] = len(paths) / (time.perf_counter() - t0)
    pl_pred = max(plain.values())
    return {"plain_img_s": pl_pred, "plain_img_s_by_batch": plain, "tlkit_img_s": tl_pred,
            "tlkit_batch": tuner.eval_batch_size, "speedup": tl_pred / pl_pred}


def scaling_rows(a, classes, full, rows) -> None:
    for n in a.scaling:
        if n > len(full):
            continue
        tr = stratified_split(subset(full, n), 0.2, 0)[0]
        lp = model_and_tuner(classes, FreezePolicy.linear_probe(), a.epochs, fast=True, feature_cache=True)
        t0 = time.perf_counter()
        lp.fit(tr)
        lp_s = time.perf_counter() - t0
        f1 = model_and_tuner(classes, FreezePolicy.full_finetune(batchnorm="frozen"), 1, fast=True, lr=1e-4)
        t0 = time.perf_counter()
        f1.fit(tr)
        rows[f"scaling {n}"] = {"train_images": len(tr), "linear_probe_s": lp_s,
                                "finetune_epoch_s": time.perf_counter() - t0}
        print(json.dumps(rows[f"scaling {n}"]), flush=True)


def print_table(a, rows) -> None:
    print("\n| benchmark | plain | tlkit | ratio |\n|---|---|---|---|")
    if "linear probe" in rows:
        _lp_lines(a, rows)
    if "full fine-tune" in rows:
        r = rows["full fine-tune"]
        print(f"| full fine-tune (img/s) | {r['plain_img_s']:.1f} | {r['tlkit_img_s']:.1f} | {r['speedup']:.1f}x |")
        print(f"| full fine-tune val top-1 after {a.ft_epochs} epochs | {r['plain_top1']:.3f} | {r['tlkit_top1']:.3f} | |")
    if "partial fine-tune memory" in rows:
        r = rows["partial fine-tune memory"]
        for k, what in (("saved_bytes", "activations kept for backward"), ("peak_delta_bytes", "peak RSS growth")):
            mb = {m: r[f"{m}_{k}"] / 2**20 for m in ("careless", "plain", "tlkit")}
            print(f"| partial fine-tune {what} (MB) | {mb['plain']:.0f} | {mb['tlkit']:.0f} | {mb['tlkit'] / mb['plain']:.2f}x |")
            print(f"| same, plain without requires_grad=False on the prefix (MB) | {mb['careless']:.0f} | {mb['tlkit']:.0f} | {mb['tlkit'] / mb['careless']:.2f}x |")
    for name, what in (("predict", "predict (img/s)"), ("predict camera-size", "predict, photos upscaled 4x (img/s)")):
        if name in rows:
            r = rows[name]
            print(f"| {what} | {r['plain_img_s']:.1f} | {r['tlkit_img_s']:.1f} | {r['speedup']:.1f}x |")


def _lp_lines(a, rows) -> None:
    r = rows["linear probe"]
    print(f"| linear probe, {a.epochs} epochs (s) | {r['plain_s']:.1f} | {r['tlkit_s']:.1f} | {r['speedup']:.1f}x faster |")
    print(f"| linear probe vs one plain forward pass (s) | {r['floor_s']:.1f} | {r['tlkit_s']:.1f} | {r['tlkit_over_floor']:.2f}x the floor |")
    print(f"| linear probe val top-1 | {r['plain_top1']:.3f} | {r['tlkit_top1']:.3f} | |")


if __name__ == "__main__":
    main()
