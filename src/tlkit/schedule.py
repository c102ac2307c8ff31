"""Learning-rate schedules as pure functions of the optimizer step.

Written as functions rather than ``torch.optim.lr_scheduler`` objects because parameter groups
join the optimizer mid-run at phase boundaries, and torch schedulers capture their
``base_lrs`` once at construction.
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "cosine_lr_factor", "lr_factor", "unfreeze_ramp"]


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


SCHEDULES = ("cosine", "linear", "poly", "step", "tanh", "constant")
"""Schedule shapes after warm-up, named as timm's schedulers (``--sched``): ``cosine`` (SGDR),
``linear`` (to ``min_ratio``), ``poly`` (power 2), ``step`` (x0.1 at 1/2 and 3/4 of the run, timm's
``multistep``), ``tanh`` (Hsueh et al. 2019) and ``constant``."""


def lr_factor(kind: str, step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """The LR factor of schedule ``kind`` (`SCHEDULES`) at ``step``: linear warm-up, then the shape.

    Every shape starts at 1 after warm-up; ``cosine``, ``linear``, ``poly`` and ``tanh`` end at
    ``min_ratio`` at ``step == total_steps``.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "cosine":
        return cosine_lr_factor(step, total_steps, warmup_steps, min_ratio)
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose from {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
    if kind == "constant":
        return 1.0
    if kind == "step":
        return 0.01 if progress >= 0.75 else (0.1 if progress >= 0.5 else 1.0)
    shape = {"linear": 1.0 - progress, "poly": (1.0 - progress) ** 2,
             "tanh": 0.5 * (1.0 - math.tanh(-6.0 + 9.0 * progress))}[kind]  # timm's tanh: lb -6, ub 3
    if kind == "tanh":  # scaled so that it starts at 1 and ends at 0
        start, end = 0.5 * (1.0 - math.tanh(-6.0)), 0.5 * (1.0 - math.tanh(3.0))
        shape = (shape - end) / (start - end)
    return min_ratio + (1.0 - min_ratio) * shape


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
