"""Single-label or multi-label: the checks and choices that depend on the task of a run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlkit._protocols import Run
    from tlkit.config import TrainConfig

__all__ = ["best_key", "check_task"]


def best_key(config: TrainConfig, multilabel: bool) -> str:
    """The record key that picks the best checkpoint: ``best_metric``, with ``top1`` read as ``map``
    for a multi-label run (which has no top-1), and ``map`` / ``micro_f1`` as ``top1`` for a single-label one."""
    key = config.best_metric
    if multilabel and key == "top1":
        return "map"
    if not multilabel and key in ("map", "micro_f1"):
        return "top1"
    return key


def check_task(tuner: Run, train: Any) -> None:
    """Refuse a multi-label dataset for a single-label head, or the other way round, before any work.

    Raises:
        ValueError: naming both and the fix.
    """
    data = getattr(train, "dataset", train)
    multilabel = getattr(data, "multilabel", None)
    if multilabel is not None and multilabel != tuner.multilabel:
        raise ValueError(f"the training data is {'multi' if multilabel else 'single'}-label but the head is "
                         f"{'multi' if tuner.multilabel else 'single'}-label: build the head with "
                         f"HeadConfig(multilabel={multilabel}) (tlkit train sets it from the data)")
    if tuner.multilabel and tuner.config.sampler == "balanced":
        raise ValueError("sampler='balanced' draws by class; a multi-label run needs sampler='shuffle' "
                         "(class_weights='balanced' weighs each label's positives instead)")
