"""The ``tlkit`` command line (also ``python -m tlkit``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tlkit.images import MAX_BYTES, MAX_PIXELS

__all__ = ["main"]


def _parse_override(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE (e.g. train.epochs=5), got {text!r}")
    return text


def _cmd_train(args: argparse.Namespace) -> int:
    from tlkit import FineTuner, RunConfig, apply_recipe, load_datasets

    config = RunConfig.from_file(args.config) if args.config else RunConfig()
    if args.recipe:
        config = apply_recipe(config, args.recipe)
    # --set comes last so it can adjust any field a recipe chose.
    config = config.with_overrides(args.set or [])
    train, val = load_datasets(config.data)
    tuner = FineTuner.from_config(config, train.classes)
    config.to_file(Path(config.output_dir) / "config.yaml")
    tuner.fit(train, val, resume=args.resume)
    print(json.dumps(tuner.evaluate(val).to_dict()))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from tlkit import FineTuner, ImageFolderDataset

    tuner = FineTuner.load(args.checkpoint, device=args.device, progress=False)
    data = ImageFolderDataset(args.data, classes=tuner.classes, allow_missing_classes=True)
    metrics = tuner.evaluate(data, batch_size=args.batch_size)
    out = metrics.to_dict()
    out.pop("loss", None)
    print(json.dumps(out))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from tlkit import FineTuner

    tuner = FineTuner.load(args.checkpoint, device=args.device, progress=False)
    preds = tuner.predict([Path(p) for p in args.images], batch_size=args.batch_size,
                          max_pixels=args.max_pixels, max_bytes=args.max_bytes)
    for path, p in zip(args.images, preds):
        print(json.dumps({"path": path, "label": p.label, "probability": p.probability,
                          "probabilities": p.probabilities}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tlkit`` command."""
    parser = argparse.ArgumentParser(prog="tlkit", description="Transfer learning on any timm backbone.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML/JSON RunConfig")
    p.add_argument("--config", type=Path, help="RunConfig file (.yaml, .yml or .json)")
    p.add_argument("--set", type=_parse_override, action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=5 --set data.root=photos")
    p.add_argument("--recipe", help="apply a named recipe (linear-probe, finetune, finetune-strong, scratch) to the config; --set values win")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/last.state.pt")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on an image folder; prints one JSON object")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint or a run folder (its best)")
    p.add_argument("--data", required=True, help="folder with one sub-folder per class (names as in the checkpoint)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="classify images; prints one JSON object per image")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint or a run folder (its best)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"refuse images whose header claims more pixels (default {MAX_PIXELS})")
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES,
                   help=f"refuse image files larger than this many bytes (default {MAX_BYTES})")
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on bad input, with the reason on stderr)."""
    from pydantic import ValidationError

    from tlkit.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, CheckpointError, ValidationError) as e:
        print(f"tlkit {args.command}: error: {e}", file=sys.stderr)
        return 2
