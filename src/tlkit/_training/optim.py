"""The optimizer over a FreezePolicy's groups, groups joining at phase boundaries, and the loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tlkit.config import TrainConfig
from tlkit.freeze import FreezePolicy
from tlkit.schedule import lr_factor, unfreeze_ramp

__all__ = ["new_optimizer", "join_phase", "set_learning_rates", "class_weights", "build_criterion"]


def new_optimizer(policy: FreezePolicy, model: nn.Module, config: TrainConfig, epoch: int,
                  lr: float) -> torch.optim.Optimizer:
    """``config.optimizer`` over the policy's parameter groups at epoch index ``epoch``, head LR ``lr``.

    Every group carries ``lr_scale`` (its layer-wise factor) and ``group`` (its stage name).
    """
    groups = policy.param_groups(model, epoch, lr, config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    from timm.optim import create_optimizer_v2

    # timm's registry over tlkit's groups (their LR scales and weight decay are kept per group).
    return create_optimizer_v2(groups, opt=config.optimizer, lr=lr, weight_decay=config.weight_decay,
                               momentum=config.momentum)


def join_phase(optimizer: torch.optim.Optimizer, policy: FreezePolicy, model: nn.Module, config: TrainConfig,
               epoch: int, step: int | None) -> list[str]:
    """Bring ``optimizer`` in line with the phase starting at epoch index ``epoch``.

    New groups are stamped with ``joined_step`` (saved with the optimizer state, so resume keeps
    it) for the unfreeze ramp; ``step=None`` replays a boundary on resume, where the stamps
    come back with the loaded state.

    Returns:
        Names of the parameters that joined.
    """
    before = len(optimizer.param_groups)
    joined = policy.sync_optimizer(optimizer, model, epoch, config.lr, config.weight_decay)
    if step is not None:
        for g in optimizer.param_groups[before:]:
            g["joined_step"] = step
    return joined


def set_learning_rates(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int, total_steps: int,
                       warmup_steps: int, steps_per_epoch: int) -> None:
    """Set every group's LR for optimizer step ``step``: peak x layer scale x schedule x unfreeze ramp."""
    factor = lr_factor(config.schedule, step, total_steps, warmup_steps, config.min_lr_ratio)
    span = round(config.unfreeze_warmup_epochs * steps_per_epoch)
    for g in optimizer.param_groups:
        g["lr"] = config.lr * g["lr_scale"] * factor * unfreeze_ramp(step, g.get("joined_step"), span)


class _SmoothedBCE(nn.Module):
    """``BCEWithLogitsLoss(pos_weight)`` with targets ``y * (1 - s) + s / 2``, summed over labels, mean over images."""

    def __init__(self, pos_weight: torch.Tensor | None, smoothing: float) -> None:
        super().__init__()
        self.pos_weight, self.smoothing = pos_weight, smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.float() * (1 - self.smoothing) + self.smoothing / 2
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=self.pos_weight,
                                                              reduction="none")
        return loss.sum(1).mean()


def class_weights(spec: Any, classes: Sequence[str], train: Any, device: torch.device) -> torch.Tensor | None:
    """The cross-entropy class weights ``TrainConfig.class_weights`` asks for, or ``None``.

    ``"balanced"``: ``n / (num_classes * n_c)`` over the training labels (scikit-learn's
    ``compute_class_weight("balanced")``, after King & Zeng 2001); a class without training
    images gets weight 0. For multi-label data, BCE's ``pos_weight``: each label's negatives over
    its positives (1 for a label without positives).

    Returns:
        float32 ``(num_classes,)`` on ``device``, or ``None`` for ``"none"``.

    Raises:
        ValueError: a weight list of the wrong length, or ``"balanced"`` on data without ``targets``.
    """
    n_classes = len(classes)
    if spec == "none":
        return None
    if isinstance(spec, list):
        if len(spec) != n_classes:
            raise ValueError(f"class_weights has {len(spec)} values but there are {n_classes} classes {list(classes)}")
        return torch.tensor(spec, dtype=torch.float32, device=device)
    data = train.dataset if isinstance(train, torch.utils.data.DataLoader) else train
    targets = getattr(data, "targets", None)
    if targets is None:
        raise ValueError('class_weights="balanced" needs training data with a `targets` list (an ImageFolderDataset)')
    if getattr(data, "multilabel", False):  # BCE's pos_weight: negatives / positives of each label
        pos = torch.zeros(n_classes, dtype=torch.float64)
        for labels in targets:
            pos[list(labels)] += 1
        neg = len(targets) - pos
        return torch.where(pos > 0, neg / pos.clamp_min(1), torch.ones_like(pos)).float().to(device)
    counts = torch.bincount(torch.as_tensor(list(targets)), minlength=n_classes).double()
    weights = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp_min(1)), torch.zeros_like(counts))
    return weights.float().to(device)


def build_criterion(config: TrainConfig, weights: torch.Tensor | None, num_classes: int,
                    mix: bool = True, multilabel: bool = False) -> tuple[nn.Module, Any]:
    """The training loss and timm's ``Mixup`` (``None`` when mixup and CutMix are off or ``mix=False``).

    timm's Mixup smooths the mixed targets itself, so the loss then does not smooth again.
    Multi-label: binary cross-entropy on the logits, ``weights`` as ``pos_weight`` (see
    `class_weights`), targets smoothed towards 0.5 by ``label_smoothing``; no mixup.

    Raises:
        ValueError: mixup or CutMix asked for a multi-label run.
    """
    if multilabel:
        if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
            raise ValueError("mixup and CutMix mix one label per image; a multi-label run needs mixup_alpha = "
                             "cutmix_alpha = 0")
        return _SmoothedBCE(weights, config.label_smoothing), None
    mixup = None
    if mix and (config.mixup_alpha > 0 or config.cutmix_alpha > 0):
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha, prob=config.mixup_prob,
                      label_smoothing=config.label_smoothing, num_classes=num_classes)
    smoothing = 0.0 if mixup else config.label_smoothing
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=smoothing), mixup
