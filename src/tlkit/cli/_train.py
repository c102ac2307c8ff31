"""The commands that start runs: ``tlkit train``, ``config``, ``lr-find`` and ``rank``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tlkit.cli._args import _require_device


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

