"""Single-label or multi-label: the checks and choices that depend on the task of a run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tlkit.config import best_key

if TYPE_CHECKING:
    from tlkit._protocols import Run

__all__ = ["best_key", "check_task"]


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
