"""``tlkit export``: ONNX, TorchScript and INT8 ONNX files, with their calibration photos."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tlkit._text import escape_control
from tlkit.cli._args import _option_files, _recorded_data, _run_config_file, _spread
from tlkit.images import MAX_BYTES, MAX_PIXELS


def _cmd_export(args: argparse.Namespace) -> int:
    from tlkit import FineTuner
    from tlkit.export import (
        check_onnx,
        check_torch_export,
        check_torchscript,
        export_onnx,
        export_torch,
        export_torchscript,
    )

    _check_output(args)  # before the model loads: a refusal costs nothing
    tuner = FineTuner.load(args.checkpoint, device="cpu", progress=False)
    meta = {"classes": tuner.classes, "data_config": tuner.data_config, "backbone": tuner.backbone.name}
    size = tuple(tuner.data_config["input_size"])
    # The check's photos are read before anything is written: a bad --check leaves no file behind.
    x, labels = _check_batch(tuner, args.check, args.check_limit) if args.check is not None else (None, None)
    if args.format == "onnx-int8":
        return _export_int8(tuner, args, meta, size, x, labels)
    if args.format == "timm":
        from tlkit.hub import check_timm_folder

        out, check = tuner.save_pretrained(args.output), check_timm_folder
    elif args.format == "torchscript":
        out, check = export_torchscript(tuner.model, args.output, size, metadata=meta), check_torchscript
    elif args.format == "torch-export":
        out, check = export_torch(tuner.model, args.output, size, metadata=meta), check_torch_export
    else:
        out, check = export_onnx(tuner.model, args.output, size, opset=args.opset, metadata=meta), check_onnx
    result: dict = {"format": args.format, "path": str(out)}
    if args.format == "timm":
        result["load_with"] = f"timm.create_model('local-dir:{out}', pretrained=True)"
    if x is not None:
        result.update(checked_images=len(x), max_abs_logit_diff=check(out, tuner.model, x))
    print(json.dumps(result))
    return 0


def _within_memory(tuner, args: argparse.Namespace, calibration, size: tuple):
    """The calibration photos, evenly thinned to what the histogram methods can hold in half the
    memory available (`tlkit.quantize.calibration_cap`), said in one line; MinMax takes them all.

    Raises:
        ValueError: not even one photo fits.
    """
    from tlkit.quantize import activation_bytes, calibration_cap

    cap = calibration_cap(tuner.model, size, args.calibration_method)
    if cap is None or len(calibration) <= cap:
        return calibration
    per_photo = activation_bytes(tuner.model, size) / 2**30
    if cap == 0:
        raise ValueError(f"--calibration-method {args.calibration_method}: one photo's activations ({per_photo:.2f} GiB) "
                         "exceed half of the memory available; use --calibration-method minmax")
    print(f"tlkit export: note: --calibration-method {args.calibration_method} keeps every activation "
          f"({per_photo:.2f} GiB a photo): calibrating on {cap} of the {len(calibration)} photos to stay within half "
          "of the memory available", file=sys.stderr)
    keep = [i * len(calibration) // cap for i in range(cap)]
    return calibration[keep]


def _check_output(args: argparse.Namespace) -> None:
    """``--output`` is never the checkpoint, its run folder or one of the run's files, and an existing
    file or folder is replaced only with ``--overwrite`` (exports write a temporary file, then rename).

    Raises:
        ValueError: naming ``--output`` and what to do.
    """
    from tlkit.checkpoint import resolve_checkpoint
    from tlkit.runlock import RUN_FILES

    out = Path(args.output)
    checkpoint = resolve_checkpoint(args.checkpoint).resolve()
    run = checkpoint.parent
    target = out.resolve()
    if target == checkpoint or checkpoint.is_relative_to(target) or (
            target.parent == run and target.name in {*RUN_FILES, "config.yaml", "last.state.pt"}):
        raise ValueError(f"--output {out}: is the checkpoint being exported, a file of its run, or a folder "
                         "holding it; export somewhere else")
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise ValueError(f"--output {out}: already exists; pass --overwrite to replace it")


def _export_int8(tuner, args: argparse.Namespace, meta: dict, size: tuple, x, labels) -> int:
    """``--format onnx-int8``: calibrate, quantise, and with ``--check`` compare with the float32 ONNX."""
    import tempfile

    from tlkit._cpu import int8_note
    from tlkit.export import export_onnx
    from tlkit.quantize import compare_onnx, export_onnx_int8

    calibration, source = _calibration_batch(tuner, args)
    calibration = _within_memory(tuner, args, calibration, size)
    note = int8_note()
    if note:  # said before the quantisation: the user may want the float32 export instead
        print(f"tlkit export: note: {note}", file=sys.stderr)
    out = export_onnx_int8(tuner.model, args.output, size, calibration, metadata=meta, opset=args.opset,
                           method=args.calibration_method, reduce_range=args.reduce_range)
    result: dict = {"format": "onnx-int8", "path": str(out), "calibration": source,
                    "calibration_images": len(calibration), "calibration_method": args.calibration_method}
    if x is not None:
        with tempfile.TemporaryDirectory(prefix="tlkit-fp32-") as tmp:
            fp32 = export_onnx(tuner.model, Path(tmp) / "fp32.onnx", size, opset=args.opset, metadata=meta)
            result.update(compare_onnx(fp32, out, x, labels))
    print(json.dumps(result))
    return 0


def _inputs(tuner, files: list[Path], option: str) -> tuple:
    """``(inputs (N, 3, H, W), the files read)``: ``files`` read as `tlkit predict` reads them; an
    unreadable one is reported on stderr (one line, like predict) and costs only itself.

    Raises:
        ValueError: not one of ``files`` could be read (names ``option``).
    """
    import torch

    from tlkit.images import BadImageError

    tensors, kept = [], []
    for f in files:
        try:
            tensors.append(tuner.prepare_input(f, MAX_PIXELS, MAX_BYTES))
            kept.append(f)
        except (BadImageError, OSError) as e:
            print(f"tlkit export: skipped: {escape_control(str(e))}", file=sys.stderr)
    if not tensors:
        raise ValueError(f"{option}: none of its {len(files)} image files could be read")
    return torch.stack(tensors), kept


def _calibration_batch(tuner, args: argparse.Namespace):
    """``(calibration inputs, where they came from)``: ``--calibration``, else the run's training split."""
    from tlkit import load_datasets

    if args.calibration is not None:
        files, source = _option_files("--calibration", args.calibration), str(args.calibration)
    else:
        config_file = _run_config_file(args.checkpoint)
        if not config_file.is_file():
            raise ValueError(f"--format onnx-int8 needs --calibration FOLDER (photos like the training ones), "
                             f"or a checkpoint beside the config.yaml of its run (no {config_file})")
        train, _ = load_datasets(_recorded_data(args.checkpoint, "--format onnx-int8"))
        files, source = [Path(p) for p, _ in train.samples], f"training split of {config_file}"
    files = _spread(files, args.calibration_images)
    if not files:
        raise ValueError(f"--calibration {source}: no image files there")
    return _inputs(tuner, files, "--calibration")[0], source


def _check_batch(tuner, where: Path, limit: int = 16):
    """``(inputs, labels or None)`` of up to ``limit`` photos (0: all) of a folder, file or glob.

    Labels come from class sub-folders named like the checkpoint's classes (``None`` otherwise).
    """
    files = _option_files("--check", where)
    files = _spread(files, limit) if limit else files
    if not files:
        raise ValueError(f"--check {where}: no image files there")
    x, files = _inputs(tuner, files, "--check")
    named = Path(where).is_dir() and all(f.parent.name in tuner.classes for f in files)
    return x, ([tuner.classes.index(f.parent.name) for f in files] if named else None)

