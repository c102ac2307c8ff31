"""Learning-rate schedules as pure functions of the optimizer step.

Written as functions rather than ``torch.optim.lr_scheduler`` objects because parameter groups
join the optimizer mid-run at phase boundaries, and torch schedulers capture their
``base_lrs`` once at construction.
"""

from __future__ import annotations

import math

__all__ = ["cosine_lr_factor", "unfreeze_ramp"]


def cosine_lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up then half-cosine decay (Loshchilov & Hutter, SGDR, 2017), as a factor in [0, 1].

    Args:
        step: optimizer steps taken so far (0-based).
        total_steps: steps in the whole run.
        warmup_steps: steps of linear warm-up from ``1 / (warmup_steps + 1)`` to 1.
        min_ratio: the factor reached at ``step == total_steps`` (the end of the run).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def unfreeze_ramp(step: int, joined_step: int | None, span: int) -> float:
    """LR factor of a parameter group that joined the optimizer at a phase boundary.

    Linear from ``1 / (span + 1)`` to 1 over ``span`` steps after ``joined_step``; 1 for groups
    trained from the start (``joined_step`` is ``None``) or when ``span <= 0``. Adam's first
    updates of newly unfrozen weights are as large as the LR itself, so they start small.

    Args:
        step: optimizer steps taken so far (0-based).
        joined_step: the step at which the group joined, or ``None``.
        span: ramp length in steps (``TrainConfig.unfreeze_warmup_epochs * steps_per_epoch``).
    """
    if span <= 0 or joined_step is None:
        return 1.0
    return min(1.0, (step - joined_step + 1) / (span + 1))
