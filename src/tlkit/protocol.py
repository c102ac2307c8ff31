"""Evaluation protocols: stratified k-fold cross-validation and repeated seeds on a fixed split.

One validation split is noisy (on 404 TrashNet photos one image is 0.25 points of top-1), and a
model picked by its validation score is judged on the data that picked it. Both protocols here
train the same `RunConfig` several times and report the **final** model of every run (after the
last epoch, the EMA weights if the config keeps one; no checkpoint selection on validation),
then the mean, standard deviation, minimum and maximum of each metric.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlkit.config import DatasetConfig, RunConfig

__all__ = ["ProtocolResult", "cross_validate", "repeat_seeds"]


@dataclass
class ProtocolResult:
    """Runs of one protocol and their summary.

    Attributes:
        name: ``"5-fold"``, ``"seeds 0,1,2"``...
        runs: one dict per run: ``run`` (fold or seed), ``top1``, ``macro_f1``,
            ``per_class_recall`` (class -> recall), ``train_seconds``, ``val_images``.
        summary: metric -> ``{"mean", "std", "min", "max"}`` over the runs, for ``top1``,
            ``macro_f1``, ``train_seconds`` and ``recall/<class>``. ``std`` is the sample
            standard deviation (0 for a single run).
    """

    name: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)

    def summarise(self) -> ProtocolResult:
        """Fill ``summary`` from ``runs``; returns self."""
        values: dict[str, list[float]] = {}
        for r in self.runs:
            for k in ("top1", "macro_f1", "train_seconds"):
                values.setdefault(k, []).append(float(r[k]))
            for c, v in r["per_class_recall"].items():
                values.setdefault(f"recall/{c}", []).append(float(v))
        self.summary = {
            k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                "min": min(v), "max": max(v)}
            for k, v in values.items()
        }
        return self

    def to_markdown(self) -> str:
        """A table: one row per metric, mean ± std (min to max)."""
        lines = [f"| {self.name} ({len(self.runs)} runs) | mean ± std | min | max |", "|---|---|---|---|"]
        for k, s in self.summary.items():
            lines.append(f"| {k} | {s['mean']:.4f} ± {s['std']:.4f} | {s['min']:.4f} | {s['max']:.4f} |")
        return "\n".join(lines)


def _run_once(config: RunConfig, label: Any, log: Callable[[str], None]) -> dict[str, Any]:
    from tlkit.datasets import load_datasets
    from tlkit.run import fit_run, prepare_run

    train, val = load_datasets(config.data)
    config, tuner = prepare_run(config, train, val)  # the run start of tlkit train and the example
    t0 = time.perf_counter()
    fit_run(tuner, config, train, val)  # a finished run in the folder is refused, never touched
    seconds = time.perf_counter() - t0
    m = tuner.evaluate(val)
    run = {"run": label, "top1": m.top1, "macro_f1": m.macro_f1, "per_class_recall": m.per_class_recall,
           "train_seconds": seconds, "val_images": len(val), "train_images": len(train)}
    log(json.dumps(run))
    return run


def cross_validate(
    config: RunConfig, num_folds: int = 5, *, folds: Sequence[int] | None = None,
    log: Callable[[str], None] = print,
) -> ProtocolResult:
    """Train ``config`` on each fold of a stratified k-fold split of ``config.data.root``.

    Args:
        config: the run; its ``data.split_seed`` fixes the folds, ``output_dir`` gets one
            sub-folder per fold (``fold-0``...).
        num_folds: k.
        folds: run only these folds (default all); the summary covers those run.
        log: called with one JSON line per finished run.

    Returns:
        `ProtocolResult` named ``"<k>-fold"``.

    Raises:
        ValueError: as `tlkit.stratified_kfold` and `tlkit.load_datasets`.
    """
    result = ProtocolResult(name=f"{num_folds}-fold")
    config = config.with_run_dir()
    for fold in folds if folds is not None else range(num_folds):
        data = DatasetConfig.model_validate({**config.data.model_dump(), "num_folds": num_folds, "fold": fold})
        run_cfg = config.model_copy(update={"data": data, "output_dir": Path(config.output_dir) / f"fold-{fold}"})
        result.runs.append(_run_once(run_cfg, fold, log))
    return result.summarise()


def repeat_seeds(
    config: RunConfig, seeds: Sequence[int] = (0, 1, 2), *, log: Callable[[str], None] = print
) -> ProtocolResult:
    """Train ``config`` once per training seed on its fixed split (``data.split_seed`` unchanged).

    The seed changes the head's initialisation, the batch order, augmentation and mixup draws.

    Args:
        config: the run; ``output_dir`` gets one sub-folder per seed (``seed-0``...).
        seeds: training seeds (``train.seed``).
        log: called with one JSON line per finished run.

    Returns:
        `ProtocolResult` named ``"seeds <list>"``.
    """
    result = ProtocolResult(name="seeds " + ",".join(map(str, seeds)))
    config = config.with_run_dir()
    for seed in seeds:
        run_cfg = config.model_copy(update={"train": config.train.model_copy(update={"seed": seed}),
                                            "output_dir": Path(config.output_dir) / f"seed-{seed}"})
        result.runs.append(_run_once(run_cfg, seed, log))
    return result.summarise()
