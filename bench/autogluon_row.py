"""One AutoGluon row of bench_datasets.py, run by the Python of AutoGluon's own virtual environment.

AutoGluon's ``MultiModalPredictor`` pins older torch and timm than tlkit, so it lives in a venv of
its own (``python3 -m venv ag && ag/bin/pip install autogluon.multimodal``) and bench_datasets.py
calls this file with that venv's Python. It imports nothing from tlkit.

The backbone is timm's ``tf_efficientnet_lite0`` with the same offline ImageNet weights as every
other row: bench_datasets.py writes them as ``model.safetensors`` (timm key names) and this script
places that file in a private Hugging Face hub cache under ``timm/tf_efficientnet_lite0.in1k``,
the hub id timm resolves for the name, with ``HF_HUB_OFFLINE=1``, so ``timm.create_model(...,
pretrained=True)`` inside AutoGluon loads it without a network. Everything else is AutoGluon's
default for an image classifier (its ``optim`` and ``env`` configs: AdamW 1e-4, layer-wise LR
decay 0.9, cosine with 10% warm-up, TrivialAugment, a validation split of its own, a greedy soup
of the 3 best checkpoints), with ``time_limit`` the budget bench_datasets.py gives.

    ag/bin/python bench/autogluon_row.py --split S.json --weights W.safetensors --work DIR --out R.json --time-limit 420
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

HUB_ID = "timm/tf_efficientnet_lite0.in1k"
REVISION = "0" * 40  # a made-up commit hash: the cache only needs refs/main to name a snapshot folder


def offline_hub_cache(weights: Path, home: Path) -> Path:
    """A Hugging Face cache under ``home`` in which ``HUB_ID`` resolves to ``weights``; returns ``home``."""
    repo = home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, snapshot / "model.safetensors")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return home


def offline_env(home: Path) -> dict[str, str]:
    """The environment in which huggingface_hub (and timm through it) reads only the cache at ``home``.

    ``HF_HUB_CACHE`` is set as well as ``HF_HOME`` because a user's own ``HF_HUB_CACHE`` wins over ``HF_HOME``.
    """
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", type=Path, required=True, help="bench_datasets.py's split JSON")
    p.add_argument("--weights", type=Path, required=True, help="tf_efficientnet_lite0 weights, timm key names")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--time-limit", type=int, help="whole seconds (AutoGluon's fit(time_limit=))")
    p.add_argument("--epochs", type=int, help="optim.max_epochs (default AutoGluon's, 20)")
    args = p.parse_args()
    os.environ.update(offline_env(offline_hub_cache(args.weights, args.work / "hf")))  # before huggingface_hub loads
    import pandas as pd
    from autogluon.multimodal import MultiModalPredictor

    split = json.loads(args.split.read_text())
    classes = split["classes"]
    train = pd.DataFrame({"image": [p for p, _ in split["train"]], "label": [classes[y] for _, y in split["train"]]})
    hyper = {"model.names": ["timm_image"], "model.timm_image.checkpoint_name": "tf_efficientnet_lite0",
             "env.num_gpus": 0, "env.num_workers": 2, "env.num_workers_inference": 2}
    if args.epochs:
        hyper["optim.max_epochs"] = args.epochs
    predictor = MultiModalPredictor(label="label", problem_type="multiclass", path=str(args.work / "ag"),
                                    verbosity=2)
    t0 = time.perf_counter()
    predictor.fit(train, hyperparameters=hyper, time_limit=args.time_limit, seed=0)
    seconds = time.perf_counter() - t0
    test = pd.DataFrame({"image": [p for p, _ in split["test"]]})
    labels = list(predictor.predict(test, as_pandas=False))
    index = {c: i for i, c in enumerate(classes)}
    args.out.write_text(json.dumps({
        "pred": [index[str(label)] for label in labels], "train_seconds": seconds,
        "settings": f"AutoGluon MultiModalPredictor (its defaults: AdamW 1e-4, layer-wise decay 0.9, cosine, "
                    f"TrivialAugment, own validation split, greedy soup of 3), tf_efficientnet_lite0, "
                    f"time_limit {args.time_limit} s" + (f", max_epochs {args.epochs}" if args.epochs else "")}))


if __name__ == "__main__":
    main()
