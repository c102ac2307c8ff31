"""INT8 ONNX against float32 ONNX for trained checkpoints: top-1 on held-out photos, images/s, file size.

    python bench/bench_peers.py --rows tlkit-probe-mnv2 tlkit-finetune-lite0 --out runs/bench-peers
    python bench/bench_int8.py --split runs/bench-peers/split.json \
        --checkpoint runs/bench-peers/work/tlkit-probe-mnv2/run/last.safetensors \
        --checkpoint runs/bench-peers/work/tlkit-finetune-lite0/run/last.safetensors

Calibration photos are taken evenly spaced from the split's *training pool* (the photos the
checkpoint trained on); top-1 is scored on the split's held-out photos, which neither training
nor calibration saw. Throughput is onnxruntime on this CPU at batch 1 (how an edge device
classifies one photo), default threads, float32 and INT8 timed back to back in the same process
(`tlkit.quantize.compare_onnx`). Nothing is asserted: the ratios are the result. The targets of
issue 18: top-1 within 1 point of float32, >= 2x images/s, file <= 30% of the float32 size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _inputs(tuner, files: list[str]):
    import torch

    from tlkit.images import MAX_BYTES, MAX_PIXELS

    return torch.stack([tuner.prepare_input(Path(f), MAX_PIXELS, MAX_BYTES) for f in files])


def measure(checkpoint: Path, split: dict, calibration_images: int, method: str, seconds: float) -> dict:
    from tlkit import FineTuner
    from tlkit.export import export_onnx
    from tlkit.quantize import compare_onnx, export_onnx_int8

    tuner = FineTuner.load(checkpoint, device="cpu", progress=False)
    pool = [f for f, _ in split["train"]]
    calib = _inputs(tuner, [pool[i * len(pool) // calibration_images] for i in range(calibration_images)])
    test_x = _inputs(tuner, [f for f, _ in split["test"]])
    labels = [tuner.classes.index(split["classes"][y]) for _, y in split["test"]]
    size = tuple(tuner.data_config["input_size"])
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(tuner.model, Path(tmp) / "fp32.onnx", size)
        start = time.perf_counter()
        int8 = export_onnx_int8(tuner.model, Path(tmp) / "int8.onnx", size, calib, method=method)
        quantise_s = time.perf_counter() - start
        result = compare_onnx(fp32, int8, test_x, labels, seconds=seconds)
    return {"checkpoint": str(checkpoint), "backbone": tuner.backbone.name, "input_size": list(size),
            "calibration_images": calibration_images, "method": method, "quantise_s": quantise_s, **result}


def _table(rows: list[dict]) -> str:
    head = ("| backbone | input | calibration | fp32 top-1 | INT8 top-1 | change | agreement | fp32 img/s "
            "| INT8 img/s | speed-up | fp32 MB | INT8 MB | size |\n|" + "---|" * 13)
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['input_size'][1]}x{r['input_size'][2]} | {r['calibration_images']} {r['method']} "
            f"| {r['fp32_top1']:.1%} | {r['int8_top1']:.1%} | {100 * r['top1_change']:+.1f} pt "
            f"| {r['top1_agreement']:.1%} | {r['fp32_images_per_s']:.1f} | {r['int8_images_per_s']:.1f} "
            f"| {r['speedup']:.2f}x | {r['fp32_mb']:.1f} | {r['int8_mb']:.1f} | {r['size_ratio']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, action="append", required=True)
    parser.add_argument("--split", type=Path, required=True, help="split.json written by bench/bench_peers.py")
    parser.add_argument("--calibration-images", type=int, default=128)
    parser.add_argument("--method", action="append", choices=["minmax", "percentile", "entropy"])
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per model and row")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    split = json.loads(args.split.read_text())
    rows = [measure(c, split, args.calibration_images, m, args.seconds)
            for c in args.checkpoint for m in (args.method or ["minmax"])]
    print(f"held-out photos: {len(split['test'])} (split seed {split['split_seed']}); "
          f"calibration from the training pool of {len(split['train'])}")
    print(_table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
