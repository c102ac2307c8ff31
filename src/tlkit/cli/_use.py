"""The commands that use a trained model: ``tlkit evaluate``, ``predict``, ``demo`` and ``soup``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tlkit._text import csv_cell, escape_control
from tlkit.cli._args import _expand, _recorded_data, _recorded_split, _require_device, _run_config_file, _spread


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
    from tlkit.checkpoint import save_checkpoint
    from tlkit.soup import greedy_soup, uniform_soup

    if len(args.checkpoint) < 2:
        raise ValueError("soup: give at least two --checkpoint (runs of the same recipe, other seeds or epochs)")
    if args.output.exists() and not args.overwrite:
        raise ValueError(f"--output {args.output}: already exists; pass --overwrite to replace it")
    states, metas, first = [], [], None
    for path in args.checkpoint:
        tuner = FineTuner.load(path, device="cpu", progress=False)  # each file read once, with a checkpoint's trust checks
        first = tuner if first is None else first  # kept to score states for --greedy
        # The loaded model holds exactly the file's tensors (load checks the key set); cloned, as
        # greedy scoring later writes other states into the first tuner's model.
        states.append({k: v.detach().clone() for k, v in tuner.model.state_dict().items()})
        metas.append(tuner.checkpoint_metadata)
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

