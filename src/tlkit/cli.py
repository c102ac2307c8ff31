"""The ``tlkit`` command line (also ``python -m tlkit``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from tlkit._text import csv_cell, escape_control
from tlkit.images import MAX_BYTES, MAX_PIXELS  # numpy and PIL only: `tlkit --help` imports no torch

CALIBRATION_IMAGES = 128  # = tlkit.quantize.CALIBRATION_IMAGES (a test keeps them equal; that module imports torch)

__all__ = ["main"]


def _count(least: int):
    """An argparse type: a whole number >= ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= {least}")
        return value
    return parse


def _parse_override(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE (e.g. train.epochs=5), got {text!r}")
    return text


def _device_arg(text: str) -> str:
    from tlkit.config import check_device

    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _require_device(device: str, what: str = "--device") -> None:
    """Fail now, with the reason, if ``device`` names hardware this machine lacks.

    ``what`` (the option or config field) starts the message.

    Raises:
        ValueError: CUDA or MPS asked for but not available, or a GPU index past the last GPU.
    """
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{what}: {device!r} but no CUDA GPU is available here; use 'cpu' or 'auto'")
        if index and int(index) >= count:
            raise ValueError(f"{what}: {device!r} but this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{what}: {device!r} but Apple MPS is not available here; use 'cpu' or 'auto'")


def _run_config(args: argparse.Namespace):
    """The RunConfig of ``--config``, then ``--recipe``, then every ``--set`` (which win)."""
    from tlkit import RunConfig, apply_recipe

    config = RunConfig.from_file(args.config) if args.config else RunConfig()
    if args.recipe:
        config = apply_recipe(config, args.recipe)
    return config.with_overrides(args.set or [])


def _check_run_paths(config) -> None:
    """The files and folders a RunConfig names exist, and ``output_dir`` can be made.

    Raises:
        FileNotFoundError: ``data.root``, ``data.val_root`` or ``backbone.weights`` is missing.
        ValueError: ``data.root`` unset, ``output_dir`` (or a folder above it) is a file or not
            writable, or ``feature_cache_dir`` is a file.
    """
    data = config.data
    if data.root is None and data.labels is None:
        raise ValueError("data.root is not set: give the folder that holds one sub-folder per class "
                         "(or data.labels: a CSV of paths and labels)")
    for field, folder in (("data.root", data.root), ("data.val_root", data.val_root)):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{field}: dataset folder not found: {folder}")
    if data.labels is not None and not Path(data.labels).is_file():
        raise FileNotFoundError(f"data.labels: label table not found: {data.labels}")
    weights = config.backbone.weights
    if config.backbone.pretrained and weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"backbone.weights: no such file: {weights}")
    cache = config.train.feature_cache_dir
    if cache is not None and Path(cache).exists() and not Path(cache).is_dir():
        raise ValueError(f"train.feature_cache_dir: {cache} is a file, not a folder")
    out = Path(config.output_dir)
    existing = next(p for p in (out, *out.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "not writable" if existing.is_dir() else "a file"
        raise ValueError(f"output_dir: cannot create {out}: {existing} is {problem}")


def _train_inputs(args: argparse.Namespace):
    """The RunConfig and datasets of ``tlkit train``, checked as far as possible without a model.

    Returns:
        ``(config, train, val)``. Nothing is written: the run folder does not exist yet.

    Raises:
        ValueError, FileNotFoundError: a bad config (naming the field or file), a missing
            folder or weights file, an unknown backbone name, a device this machine lacks.
    """
    from tlkit import load_datasets
    from tlkit.backbone import resolve_run_config

    # Resolved before anything is recorded: config.yaml and the checkpoints describe the network trained.
    from tlkit.run import check_resume_config

    config = resolve_run_config(_run_config(args))
    config = check_resume_config(config) if args.resume else config.with_run_dir()
    _require_device(config.train.device, "train.device")
    _check_run_paths(config)
    train, val = load_datasets(config.data)
    return config, train, val


def _cmd_config(args: argparse.Namespace) -> int:
    """Print the config ``tlkit train`` would use with the same ``--config``/``--recipe``/``--set``.

    The backbone is resolved as ``tlkit train`` resolves it (weights source, what a known weights
    file needs); ``--template`` prints the settings as given, each with its meaning.
    """
    from tlkit.backbone import resolve_run_config

    config = _run_config(args)
    sys.stdout.write(config.to_yaml(comments=True) if args.template else resolve_run_config(config).to_yaml())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from tlkit.run import fit_run, interrupted, prepare_run

    config, train, val = _train_inputs(args)
    config, tuner = prepare_run(config, train, val, resume=args.resume)
    try:
        fit_run(tuner, config, train, val, resume=args.resume, overwrite=args.overwrite,
                announce=lambda line: print(f"tlkit train: {line}", file=sys.stderr))
    except KeyboardInterrupt as e:
        # The recorded config names the run folder (a default one too) and its settings.
        again = ["tlkit", "train", "--config", str(Path(tuner.output_dir) / "config.yaml"), "--resume"]
        return interrupted(e, tuner, "tlkit train", again)
    if tuner.is_main:
        print(json.dumps(_summary(tuner)))
        print(f"tlkit train: run folder {config.output_dir}", file=sys.stderr)
    return 0


def _summary(tuner) -> dict:
    """What ``tlkit train`` prints last: the shipped checkpoint's validation metrics, as report.md has them."""
    from tlkit.config import best_key
    from tlkit.report import shipped_metrics

    record, metrics = shipped_metrics(tuner)  # tlkit train always validates
    best = tuner.best.get("epoch") == record["epoch"]
    key = best_key(tuner.config, tuner.multilabel)
    why = f"best {key} on the validation split" if best else "last validated epoch"
    return {"checkpoint": "best.safetensors" if best else "last.safetensors", "epoch": record["epoch"],
            "selected_by": why, **metrics.to_dict()}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from tlkit import FineTuner, ImageFolderDataset

    # Progress bars go to stderr, and only to a terminal: stdout stays one JSON object.
    _require_device(args.device)
    if (args.data is None) == (args.split is None):
        raise ValueError("evaluate: give --data FOLDER or --split val|test (the run's own split), not both")
    tuner = FineTuner.load(args.checkpoint, device=args.device, progress=sys.stderr.isatty())
    if args.split:
        data = _recorded_split(Path(args.checkpoint), tuner.classes, args.split)
    else:
        data = ImageFolderDataset(args.data, classes=tuner.classes, allow_missing_classes=True)
    # One line before the work (a log shows what runs), then a bar on a terminal; stdout stays the JSON.
    where = f"the {args.split} split of {_run_config_file(args.checkpoint)}" if args.split else str(args.data)
    print(f"tlkit evaluate: {len(data)} images of {escape_control(where)} on {tuner.device}"
          + (f", TTA {args.tta}" if args.tta != "none" else ""), file=sys.stderr)
    metrics = tuner.evaluate(data, batch_size=args.batch_size, tta=args.tta)
    out = metrics.to_dict()
    out.pop("loss", None)
    print(json.dumps(out))
    if args.report:
        from tlkit.report import class_report, class_report_markdown

        where = f"--split {args.split} of {args.checkpoint}" if args.split else f"{args.data}"
        text = f"# Evaluation of {args.checkpoint}\n\nData: {where}; TTA: {args.tta}.\n\n"
        args.report.parent.mkdir(parents=True, exist_ok=True)
        from tlkit._fs import atomic_write_bytes

        atomic_write_bytes(args.report, (text + class_report_markdown(class_report(metrics))).encode("utf-8"))
    return 0


def _run_config_file(checkpoint: Path | str) -> Path:
    """The ``config.yaml`` of a checkpoint's run: in the run folder given, or beside the checkpoint file."""
    checkpoint = Path(checkpoint)
    return (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.yaml"


def _recorded_data(checkpoint: Path | str, option: str):
    """The `DatasetConfig` a run recorded in its ``config.yaml``, if this user account's tlkit wrote it.

    A run folder may come from anyone, and its ``config.yaml`` names folders of the machine that
    trained it: they are read only for a run this account trained (`tlkit._origin`: the file
    carries this account's signature, unchanged since), and the folder read is said on stderr.

    Raises:
        FileNotFoundError: no ``config.yaml`` beside the checkpoint.
        ValueError: a run folder from elsewhere (or an edited ``config.yaml``); the message names
            ``option``'s alternative.
    """
    from tlkit import RunConfig
    from tlkit._origin import is_own_run

    config_file = _run_config_file(checkpoint)
    if not config_file.is_file():
        raise FileNotFoundError(f"{option}: no {config_file}: the run's split is recorded there; "
                                f"pass {_INSTEAD[option]} instead")
    if not is_own_run(config_file.parent):
        raise ValueError(f"{option}: {config_file} was not written by tlkit under this user account (a run folder "
                         f"from elsewhere, or an edited config), so the data folder it names is not read; "
                         f"pass {_INSTEAD[option]}")
    data = RunConfig.from_file(config_file).data
    source = data.labels if data.labels is not None else data.root  # a label table names the images itself
    print(f"tlkit: reading {escape_control(str(source))} as recorded in {config_file}", file=sys.stderr)
    return data


_INSTEAD = {"--split val": "--data FOLDER", "--format onnx-int8": "--calibration FOLDER (photos like the training ones)",
            "demo examples": "--examples FOLDER"}


def _recorded_split(checkpoint: Path, classes: list[str], name: str = "val"):
    """A split (``val``, or a label table's ``test`` rows) a run recorded in its ``config.yaml``
    (next to the checkpoint, or in the run folder)."""
    from tlkit.datasets import load_split

    config_file = _run_config_file(checkpoint)
    data = load_split(_recorded_data(checkpoint, "--split val"), name)
    if data.classes != classes:
        raise ValueError(f"--split {name}: {config_file} names classes {data.classes}, the checkpoint {classes}")
    return data


def _expand(patterns: list[str]) -> list[Path]:
    """Files named by paths, folders or globs (`tlkit.images.expand_image_paths`)."""
    from tlkit.images import expand_image_paths

    return expand_image_paths(patterns)


def _print_csv(rows: list[dict], classes: list[str]) -> None:
    # Class names and paths may be a stranger's: neutralise formulas, escape control characters.
    import csv

    writer = csv.writer(sys.stdout)
    writer.writerow(["path", "label", "probability", *(csv_cell(c) for c in classes)])
    for r in rows:
        writer.writerow([csv_cell(r["path"]), csv_cell(r["label"]), f"{r['probability']:.6f}",
                         *(f"{r['probabilities'][c]:.6f}" for c in classes)])


def _print_table(rows: list[dict], top_k: int) -> None:
    # Escaped, so that a class or file name cannot drive the terminal (colours, cursor, title).
    paths = [escape_control(r["path"]) for r in rows]
    width = max(len(p) for p in paths)
    print(f"{'path':<{width}}  top-{top_k}")
    for path, r in zip(paths, rows):
        unsure = "" if r["sure"] else "not sure: "  # below the reject threshold fitted on validation photos
        print(f"{path:<{width}}  {unsure}" + ", ".join(f"{escape_control(c)} {v:.1%}" for c, v in r["top"]))


def _cmd_predict(args: argparse.Namespace) -> int:
    from tlkit import FineTuner

    _require_device(args.device)
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    tuner = FineTuner.load(args.checkpoint, device=args.device, progress=sys.stderr.isatty())
    failed: list[str] = []

    def report(path: str, message: str) -> None:  # printed at once; the other files still get their row
        failed.append(path)
        print(f"tlkit predict: error: {escape_control(message)}", file=sys.stderr)

    preds = tuner.predict(_expand(args.images), batch_size=args.batch_size, tta=args.tta, top_k=args.top_k,
                          max_pixels=args.max_pixels, max_bytes=args.max_bytes, on_error=report)
    for p in [p for p in preds if not math.isfinite(p.probability)]:  # never a "probability": NaN row
        report(p.path or "?", f"{p.path}: the model's output is not finite (NaN or inf); no prediction")
        preds.remove(p)
    rows = [{"path": p.path, "label": p.label, "probability": p.probability, "top": p.top,
             "probabilities": p.probabilities, "sure": p.sure, "labels": p.labels} for p in preds]
    if args.format == "json":  # exact values: json.dumps escapes every control character
        keys = ("path", "labels", "probabilities") if tuner.multilabel else \
            ("path", "label", "probability", "sure", "probabilities")
        for r in rows:
            print(json.dumps({k: r[k] for k in keys}))
    elif args.format == "csv":
        _print_csv(rows, tuner.classes)
    elif rows:
        _print_table(rows, args.top_k)
    if failed:
        print(f"tlkit predict: {len(failed)} of {len(failed) + len(rows)} file(s) could not be classified",
              file=sys.stderr)
    return 2 if failed else 0  # bad input, as every other mistake: after the good files are printed


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


def _option_files(option: str, where: Path | str) -> list[Path]:
    """The image files an option names (a folder, file or glob; see `_expand`); a missing path is an error.

    Raises:
        FileNotFoundError: ``where`` neither exists nor is a glob; the message names ``option``.
    """
    import glob

    if not (glob.has_magic(str(where)) or Path(where).exists()):
        raise FileNotFoundError(f"{option} {where}: no such folder, file or glob match")
    return _expand([str(where)])


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


def _spread(files: list[Path], n: int) -> list[Path]:
    """``n`` files evenly spaced through ``files`` (sorted by class folder, so every class is sampled)."""
    return files if len(files) <= n else [files[i * len(files) // n] for i in range(n)]


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


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from tlkit import FineTuner, load_datasets

    config = _run_config(args)
    train, _ = load_datasets(config.data)
    tuner = FineTuner.from_config(config, train.classes)
    result = tuner.lr_find(train, start_lr=args.start_lr, end_lr=args.end_lr, num_steps=args.steps, epoch=args.epoch)
    if args.plot:
        result.plot(args.plot)
    if result.warning:
        print(f"tlkit lr-find: warning: {result.warning}", file=sys.stderr)
    print(json.dumps({"suggestion": result.suggestion, "diverged": result.diverged, "steps": len(result.lrs),
                      "warning": result.warning, "plot": str(args.plot) if args.plot else None}))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tlkit import FineTuner
    from tlkit.demo import launch_demo

    if not 0 < args.max_upload_mb <= 1024:
        raise ValueError(f"--max-upload-mb must be in (0, 1024], got {args.max_upload_mb}")
    _require_device(args.device)
    tuner = FineTuner.load(args.checkpoint, device=args.device, progress=False)
    examples = _demo_examples(tuner, args)
    launch_demo(tuner, host=args.host, port=args.port, top_k=args.top_k, tta=args.tta, share=args.share,
                max_upload_bytes=int(args.max_upload_mb * 2**20), examples=examples)
    return 0


def _demo_examples(tuner, args: argparse.Namespace, limit: int = 12) -> list[Path]:
    """``--examples``: photos of a folder or glob (at most ``limit``), ``none``, or by default one
    photo per class of the run's validation split, for a run this account trained (`_recorded_data`:
    a downloaded run folder never decides what the page publishes)."""
    if args.examples == "none":
        return []
    if args.examples:
        return _spread(_expand([args.examples]), limit)
    from tlkit import load_datasets

    try:
        _, val = load_datasets(_recorded_data(Path(args.checkpoint), "demo examples"))
    except (OSError, ValueError) as e:  # no recorded run, a stranger's, or its photos are elsewhere: none
        print(f"tlkit demo: no example photos: {escape_control(str(e))}", file=sys.stderr)
        return []
    if val.classes != tuner.classes:
        return []
    first: dict[int, Path] = {}
    for path, label in val.samples:
        first.setdefault(label, Path(path))
    return [first[k] for k in sorted(first)][:limit]


def _offline_weights(name: str) -> str:
    """Where weights for ``name`` can be had without network, or ``""``."""
    from tlkit.pretrained import hub_cache_file, local_weights

    local = local_weights(name)
    if local is not None:
        return f"file ({local[1].source}): {local[0]}"
    cached = hub_cache_file(name)
    return f"hub cache: {cached}" if cached else ""


def _rank_candidates(args: argparse.Namespace) -> list:
    """BackboneConfigs from ``--backbones FILE`` (a YAML/JSON list) and ``--backbone NAME[=WEIGHTS]``."""
    import yaml

    from tlkit.config import BackboneConfig

    specs: list = []
    if args.backbones:
        loaded = yaml.safe_load(args.backbones.read_text(encoding="utf-8"))
        if not isinstance(loaded, list):
            raise ValueError(f"{args.backbones}: must hold a list of backbone configs (name, weights, ...)")
        specs += [BackboneConfig.model_validate(x) for x in loaded]
    for text in args.backbone or []:
        name, sep, weights = text.partition("=")
        specs.append(BackboneConfig(name=name, weights=weights or None, pretrained=True))
    if not specs:
        raise ValueError("name at least one backbone: --backbone NAME[=WEIGHTS] or --backbones FILE")
    return specs


def _cmd_rank(args: argparse.Namespace) -> int:
    from tlkit.data import ImageFolderDataset
    from tlkit.transferability import rank_backbones

    candidates = _rank_candidates(args)
    data = ImageFolderDataset(args.data)
    results = rank_backbones(data, candidates, batch_size=args.batch_size, device=args.device,
                             num_workers=args.workers)
    if args.format == "json":
        for r in results:
            print(json.dumps(r.to_dict()))
        return 0
    print(f"{'rank':<5}{'backbone':<28}{'weights':<34}{'LogME':>8}{'probe top-1':>13}{'s':>7}")
    for i, r in enumerate(results, 1):
        print(f"{i:<5}{r.name:<28}{r.weights[:33]:<34}{r.logme:>8.3f}{r.probe_top1:>13.1%}{r.seconds:>7.1f}")
    return 0


def _soup_scorer(tuner, folder: Path):
    """The validation score of a state for ``soup --greedy``: top-1 (mAP for multi-label) on ``folder``,
    through ``tuner`` (a `FineTuner` of the soup's architecture; its weights are replaced)."""
    from tlkit import ImageFolderDataset

    data = ImageFolderDataset(folder, classes=tuner.classes, allow_missing_classes=True)
    key = "map" if tuner.multilabel else "top1"

    def score(state) -> float:
        tuner.model.load_state_dict(state)
        return float(tuner.evaluate(data).to_dict()[key])

    return score


def _cmd_soup(args: argparse.Namespace) -> int:
    """Average checkpoints of one architecture and one class list into one (a uniform or greedy model soup)."""
    from tlkit import FineTuner
    from tlkit.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
    from tlkit.soup import greedy_soup, uniform_soup

    if len(args.checkpoint) < 2:
        raise ValueError("soup: give at least two --checkpoint (runs of the same recipe, other seeds or epochs)")
    if args.output.exists() and not args.overwrite:
        raise ValueError(f"--output {args.output}: already exists; pass --overwrite to replace it")
    states, metas, first = [], [], None
    for path in args.checkpoint:
        tuner = FineTuner.load(path, device="cpu", progress=False)  # the trust checks of a checkpoint, each file
        first = tuner if first is None else first  # kept to score states for --greedy
        state, meta = load_checkpoint(resolve_checkpoint(path))
        states.append(state)
        metas.append(meta)
    for key in ("backbone", "classes", "data_config", "head"):
        if any(m[key] != metas[0][key] for m in metas[1:]):
            raise ValueError(f"soup: the checkpoints differ in {key}; only models of one run recipe average")
    if args.greedy:
        soup, kept = greedy_soup(states, _soup_scorer(first, args.greedy))
    else:
        soup, kept = uniform_soup(states), list(range(len(states)))
    meta = {**metas[0], "metrics": {"soup_models": len(kept)}}
    meta.pop("calibration", None)  # a soup's confidence is not its ingredients': fit it again on validation photos
    out = save_checkpoint(args.output, soup, meta)
    print(json.dumps({"soup": str(out), "models": len(kept), "kept": [str(args.checkpoint[i]) for i in kept]}))
    return 0


def _environment() -> dict:
    """What this machine offers tlkit and what tlkit chooses on it (``tlkit env``)."""
    import platform

    import torch

    from tlkit._cpu import cpu_features, cpu_name
    from tlkit._runtime import resolve_device, resolve_precision
    from tlkit._version import __version__

    device = resolve_device("auto")
    amp = resolve_precision("auto", device)
    out = {"tlkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "cpu": cpu_name(), "cpu_features": cpu_features(), "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
           "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
           if torch.cuda.is_available() else [],
           "chosen": {"device": str(device), "precision": str(amp).removeprefix("torch.") if amp else "fp32",
                      "channels_last": "on for convolutional models", "threads": torch.get_num_threads()}}
    import timm

    out["timm"] = timm.__version__
    return out


def _cmd_env(args: argparse.Namespace) -> int:
    """Print the environment: versions, the CPU's features, GPUs, and the path tlkit picks here."""
    env = _environment()
    if args.format == "json":
        print(json.dumps(env))
        return 0
    feats = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in env["cpu_features"].items() if v is not None)
    print(f"tlkit {env['tlkit']} (torch {env['torch']}, timm {env['timm']}, Python {env['python']})")
    print(f"CPU: {env['cpu']}, {env['cores']} cores; {feats or 'features unknown'}")
    print(f"GPUs: {', '.join(env['cuda']) or 'none'}")
    c = env["chosen"]
    print(f"chosen: device {c['device']}, precision {c['precision']} (autocast; 'auto' picks bf16 only where the "
          f"CPU or GPU has it), channels_last {c['channels_last']}, {c['threads']} threads")
    return 0


def _cmd_shards(args: argparse.Namespace) -> int:
    """Write an image folder or a label table as WebDataset tar shards (`tlkit.shards.write_shards`)."""
    from tlkit.data import ImageFolderDataset
    from tlkit.shards import write_shards

    if (args.data is None) == (args.labels is None):
        raise ValueError("shards: give --data FOLDER (one sub-folder per class) or --labels TABLE, one of them")
    if args.labels is not None:
        from tlkit.table import LabelTableDataset

        data = LabelTableDataset(args.labels)
    else:
        data = ImageFolderDataset(args.data)
    report = data.scan()  # a bad file is reported and left out, never written into a shard
    if report.bad:
        print(escape_control(report.summary(), keep="\n"), file=sys.stderr)
    paths = write_shards(data, args.output, samples_per_shard=args.samples_per_shard, seed=args.seed)
    print(json.dumps({"shards": len(paths), "samples": len(data), "folder": str(args.output)}))
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    import timm

    names = timm.list_models(args.pattern or "*", pretrained=args.pretrained)
    if not names:
        import difflib

        close = difflib.get_close_matches(args.pattern, timm.list_models(pretrained=args.pretrained), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; patterns are globs, e.g. '*mobilenet*'"
        raise ValueError(f"no timm model matches {args.pattern!r}{hint}")
    shown = 0
    for name in names:
        offline = _offline_weights(name.split(".")[0]) if args.offline or args.pattern else ""
        if args.offline and not offline:
            continue
        shown += 1
        print(f"{name}\t{offline}" if offline else name)
    if not shown:
        print(f"tlkit backbones: none of the {len(names)} matching model(s) has weights on this machine "
              "(a weights file: BackboneConfig.weights / --set backbone.weights=FILE)", file=sys.stderr)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``tlkit export: error: ... (see tlkit export --help)``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tlkit`` command."""
    from tlkit._version import __version__

    parser = _Parser(prog="tlkit", description="Transfer learning on any timm backbone.")
    parser.add_argument("--version", action="version", version=f"tlkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_run_commands(sub)
    _add_checkpoint_commands(sub)
    return parser


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that read a RunConfig or data folder: train, config, lr-find, rank, backbones."""
    p = sub.add_parser("train", help="train from a YAML/JSON RunConfig (also under torchrun: DDP, batch_size per process)")
    p.add_argument("--config", type=Path, help="RunConfig file (.yaml, .yml or .json)")
    p.add_argument("--set", type=_parse_override, action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=5 --set data.root=photos")
    p.add_argument("--recipe", help="apply a named recipe (auto, linear-probe, finetune, finetune-strong, lp-ft, scratch) to the config; --set values win")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/last.state.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in output_dir (without it, or --resume, such a folder is refused)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="print the resolved RunConfig as YAML (--template: every field, commented)")
    p.add_argument("--config", type=Path, help="RunConfig file (.yaml, .yml or .json); default: the defaults")
    p.add_argument("--recipe", help="apply a named recipe first")
    p.add_argument("--set", type=_parse_override, action="append", metavar="KEY=VALUE")
    p.add_argument("--template", action="store_true", help="each field's description as a comment above it")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("lr-find", help="learning-rate range test on a RunConfig's training data")
    p.add_argument("--config", type=Path, help="RunConfig file (.yaml, .yml or .json)")
    p.add_argument("--recipe", help="apply a named recipe first")
    p.add_argument("--set", type=_parse_override, action="append", metavar="KEY=VALUE")
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--epoch", type=int, default=0, help="which phase of the freeze policy to test")
    p.add_argument("--plot", type=Path, help="save the loss-against-LR plot here (PNG)")
    p.set_defaults(func=_cmd_lr_find)

    p = sub.add_parser("rank", help="rank backbones for a dataset from frozen features (LogME, linear-probe top-1)")
    p.add_argument("--data", required=True, type=Path, help="folder with one sub-folder per class")
    p.add_argument("--backbone", action="append", metavar="NAME[=WEIGHTS]",
                   help="a timm name, with a local weights file after '=' (else hub weights); repeat it")
    p.add_argument("--backbones", type=Path, help="YAML/JSON list of backbone configs (name, weights, model_kwargs, data_config)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1,
                   help="loader processes that decode the images once for every backbone (default 1; 0: none)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=_cmd_rank)

    p = sub.add_parser("shards", help="write an image folder or a label table as WebDataset tar shards")
    p.add_argument("--data", type=Path, help="folder with one sub-folder per class")
    p.add_argument("--labels", type=Path, help="a label table (CSV/TSV) instead")
    p.add_argument("--output", required=True, type=Path, help="an empty folder for the shards and shards.json")
    p.add_argument("--samples-per-shard", type=_count(1), default=1000, help="samples in each shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="the shuffle that spreads every class over the shards")
    p.set_defaults(func=_cmd_shards)

    p = sub.add_parser("env", help="versions, the CPU's features (AVX2, AVX512, BF16, VNNI, AMX), GPUs, and the path "
                                   "tlkit picks on this machine")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("backbones", help="list timm model names, and where weights are available offline")
    p.add_argument("pattern", nargs="?", help="wildcard filter, e.g. 'mobilenet*'")
    p.add_argument("--pretrained", action="store_true", help="only names with pretrained weights (name.tag)")
    p.add_argument("--offline", action="store_true", help="only models whose weights load without network")
    p.set_defaults(func=_cmd_backbones)


def _add_checkpoint_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that read a checkpoint: evaluate, predict, export, demo."""
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on an image folder; prints one JSON object")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint or a run folder (its best)")
    p.add_argument("--data", help="folder with one sub-folder per class (names as in the checkpoint)")
    p.add_argument("--split", choices=["val", "test"],
                   help="evaluate on the run's own validation split, or a label table's test rows (from its config.yaml)")
    p.add_argument("--tta", choices=["none", "hflip", "multi-crop"], default="none", help="test-time augmentation")
    p.add_argument("--report", type=Path, help="also write the per-class report (Markdown) here")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: 16 on CPU, 64 on GPU)")
    p.add_argument("--device", default="auto", type=_device_arg, help="auto (default), cpu, cuda, cuda:N or mps")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="classify images; prints one JSON object per image")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint or a run folder (its best)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: 16 on CPU, 64 on GPU)")
    p.add_argument("--device", default="auto", type=_device_arg, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"refuse images whose header claims more pixels (default {MAX_PIXELS})")
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES,
                   help=f"refuse image files larger than this many bytes (default {MAX_BYTES})")
    p.add_argument("--format", choices=["table", "json", "csv"], default="json",
                   help="table: top-k per image; json: one object per line; csv: every class probability")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image in the table (default 3)")
    p.add_argument("--tta", choices=["none", "hflip", "multi-crop"], default="none",
                   help="test-time augmentation: average probabilities over flipped / cropped views")
    p.set_defaults(func=_cmd_predict)

    _add_export_command(sub)

    p = sub.add_parser("soup", help="average checkpoints of one recipe (other seeds or epochs) into one: a model soup")
    p.add_argument("--checkpoint", action="append", required=True, metavar="PATH",
                   help="a .safetensors checkpoint or a run folder; repeat it (at least two)")
    p.add_argument("--output", required=True, type=Path, help="the .safetensors file to write")
    p.add_argument("--greedy", type=Path, metavar="VAL_FOLDER",
                   help="a greedy soup: keep a checkpoint only if it does not lower top-1 (mAP) on these "
                        "validation photos, one folder per class (never the photos that judge the soup)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=_cmd_soup)

    p = sub.add_parser("demo", help="serve a web page that classifies an uploaded photo (needs tlkit[demo])")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint or a run folder (its best)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on; 0.0.0.0 serves other machines (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default: the first free port from 7860)")
    p.add_argument("--top-k", type=int, default=3, help="classes shown with their probabilities (default 3)")
    p.add_argument("--examples", help="example photos under the upload: a folder or glob (at most 12), or none; "
                                      "default: one photo per class of the run's validation split")
    p.add_argument("--tta", choices=["none", "hflip", "multi-crop"], default="none",
                   help="test-time augmentation, as in predict")
    p.add_argument("--device", default="auto", type=_device_arg, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs network)")
    p.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="refuse uploads larger than this many MiB (default 20); uploads are deleted once classified")
    p.set_defaults(func=_cmd_demo)


def _add_export_command(sub: argparse._SubParsersAction) -> None:
    """``tlkit export``: every deployment format and its checks."""
    p = sub.add_parser("export", help="export a checkpoint: ONNX (float32 or INT8), torch.export, TorchScript or a plain timm folder")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint or a run folder (its best)")
    p.add_argument("--output", required=True, type=Path,
                   help="the file to write (.onnx, .pt2 or .pt), or the folder for --format timm")
    p.add_argument("--format", choices=["onnx", "onnx-int8", "torch-export", "torchscript", "timm"], default="onnx",
                   help="onnx-int8: statically quantised for the edge (calibrated on photos); torch-export: a "
                        ".pt2 ExportedProgram (dynamic batch); timm: a folder plain timm loads with "
                        "create_model('local-dir:PATH', pretrained=True)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it exists (never the checkpoint or its run's files)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--check", type=Path,
                   help="image folder or file/glob: compare the export with PyTorch (onnx-int8: with the float32 "
                        "ONNX model: top-1 agreement, top-1 with class sub-folders, images/s, file size)")
    p.add_argument("--check-limit", type=_count(0), default=16,
                   help="photos of --check used, evenly spaced (default 16; 0: all)")
    p.add_argument("--calibration", type=Path,
                   help="onnx-int8: photos like the training ones (default: the run's training split, "
                        "read from the config.yaml beside the checkpoint)")
    p.add_argument("--calibration-images", type=_count(1), default=CALIBRATION_IMAGES,
                   help=f"onnx-int8: calibration photos used, evenly spaced (default {CALIBRATION_IMAGES})")
    p.add_argument("--calibration-method", choices=["minmax", "percentile", "entropy"], default="minmax",
                   help="onnx-int8: how activation ranges are set (onnxruntime CalibrationMethod; default minmax)")
    p.add_argument("--reduce-range", action="store_true",
                   help="onnx-int8: 7-bit weights, for x86 CPUs without VNNI (onnxruntime's saturation note)")
    p.set_defaults(func=_cmd_export)


def _one_line(errors: list[dict], root: type | None = None) -> str:
    """pydantic's errors as ``field: message (got value)``, joined by ``; `` (its str is 4 lines each).

    An unknown key of ``root`` (the model validated) gets the closest field names.
    """
    from tlkit._strict import close_keys

    parts = []
    for err in errors:
        field = ".".join(str(x) for x in err["loc"]) or "config"
        message, value = err["msg"].removeprefix("Value error, "), err.get("input")
        close = close_keys(root, tuple(err["loc"])) if root is not None and err["type"] == "extra_forbidden" else []
        if close:
            message = f"unknown key, did you mean {' or '.join(repr(c) for c in close)}?"
        # The value, unless the message quotes it already or it is a long section.
        quiet = "got " in message or isinstance(value, (dict, list)) and len(repr(value)) > 60
        parts.append(f"{field}: {message}" + ("" if quiet else f" (got {repr(value)[:60]})"))
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on bad input, with the reason on stderr)."""
    args = build_parser().parse_args(argv)  # before the heavy imports: --help and --version stay fast
    from pydantic import ValidationError

    from tlkit._fs import SymlinkRefused
    from tlkit._runfiles import RunFileError
    from tlkit.backbone import HubDownloadError
    from tlkit.checkpoint import CheckpointError
    from tlkit.distributed import destroy_distributed
    from tlkit.runlock import OutputDirError, RunLockedError

    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, CheckpointError, ValidationError, RunLockedError,
            OutputDirError, HubDownloadError, SymlinkRefused) as e:
        if isinstance(e, ValidationError):
            from tlkit.config import RunConfig

            message = _one_line(e.errors(include_url=False), RunConfig if e.title == "RunConfig" else None)
        else:
            message = str(e)
        # Messages quote file names, class names and config values: never raw control characters.
        print(f"tlkit {args.command}: error: {escape_control(message, keep=chr(10))}", file=sys.stderr)
        return 2
    except (RunFileError, FloatingPointError) as e:  # the run's state is known; no traceback helps
        print(f"tlkit {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed()  # under torchrun; a no-op in one process
