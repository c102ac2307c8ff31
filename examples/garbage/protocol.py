"""Judge a recipe by more than one split: stratified k-fold cross-validation, or 3 training seeds.

    python examples/garbage/protocol.py --data ../shared/data/trashnet --recipe linear-probe --folds 5
    python examples/garbage/protocol.py --data ../shared/data/trashnet --recipe finetune-strong --seeds 0 1 2

Takes every option of train.py (backbone, weights, --set ...). Prints one JSON line per run and
a Markdown table of mean ± std, min and max of top-1, macro-F1, per-class recall and training
time; writes it to <output>/protocol.json. Each run reports its final model (no checkpoint
chosen on the validation set it is scored on).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import build_config, build_parser  # noqa: E402

from tlkit.protocol import cross_validate, repeat_seeds  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = build_parser()
    p.description = __doc__.split("\n\n")[0]
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--folds", type=int, help="stratified k-fold cross-validation (split by --seed)")
    group.add_argument("--seeds", type=int, nargs="+", help="training seeds on the fixed --seed split")
    p.add_argument("--only-folds", type=int, nargs="+", help="run only these folds")
    args = p.parse_args(argv)
    if args.output is None:
        args.output = Path("runs") / f"protocol-{args.backbone}-{args.recipe}"
    config = build_config(args)
    if args.folds:
        result = cross_validate(config, args.folds, folds=args.only_folds)
    else:
        result = repeat_seeds(config, args.seeds)
    print(result.to_markdown())
    out = {"name": result.name, "runs": result.runs, "summary": result.summary}
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.output_dir) / "protocol.json").write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
