"""Test-time augmentation: average the class probabilities of several views of each input.

Modes:

* ``"none"``: the input as given.
* ``"hflip"``: the input and its horizontal mirror (2 views).
* ``"multi-crop"``: the classic 10-crop (Krizhevsky et al., 2012), taken from the eval input:
  the centre and the four corner crops of 87.5% of its side, each resized back to the input
  size (bilinear, antialiased), and their horizontal mirrors.

Probabilities are averaged, not logits (the usual choice, e.g. in timm's and fastai's TTA), and
returned as log-probabilities, so ``argmax`` gives the class and ``nll_loss`` the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch.nn import functional as F

__all__ = ["TTA_MODES", "TTAMode", "check_tta_mode", "tta_log_probs", "tta_views"]

TTAMode = Literal["none", "hflip", "multi-crop"]
TTA_MODES: tuple[str, ...] = ("none", "hflip", "multi-crop")
_CROP = 0.875


def check_tta_mode(mode: str) -> None:
    """Raise ``ValueError`` naming ``mode`` unless it is one of `TTA_MODES`."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown tta mode {mode!r}; choose from {TTA_MODES}")


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a batch for ``mode``.

    Args:
        x: model input, float ``(B, C, H, W)``.
        mode: one of `TTA_MODES`.

    Returns:
        Tensors of the same shape, dtype and memory format as ``x``: 1, 2 or 10 of them.

    Raises:
        ValueError: an unknown mode.
    """
    check_tta_mode(mode)
    if mode == "none":
        return [x]
    if mode == "hflip":
        return [x, x.flip(-1)]
    h, w = x.shape[-2:]
    ch, cw = round(h * _CROP), round(w * _CROP)
    top, left = (h - ch) // 2, (w - cw) // 2
    boxes = [(top, left), (0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)]
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.ndim == 4 else torch.contiguous_format
    crops = [
        F.interpolate(x[..., t:t + ch, left:left + cw], size=(h, w), mode="bilinear", align_corners=False,
                      antialias=True)
        .contiguous(memory_format=fmt)
        for t, left in boxes
    ]
    return crops + [c.flip(-1) for c in crops]


def tta_log_probs(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str) -> torch.Tensor:
    """Log of the class probabilities averaged over the views of ``x``.

    Args:
        forward: maps a batch to logits ``(B, num_classes)`` (the model, under autocast if wanted).
        x: model input ``(B, C, H, W)``.
        mode: one of `TTA_MODES`.

    Returns:
        float32 ``(B, num_classes)`` log-probabilities. For ``"none"`` this is
        ``log_softmax(forward(x))``.
    """
    probs = None
    views = tta_views(x, mode)
    for v in views:
        p = forward(v).float().softmax(-1)
        probs = p if probs is None else probs + p
    return (probs / len(views)).clamp_min(torch.finfo(torch.float32).tiny).log()
