"""Which weights a run validates, checkpoints and keeps: the model, its EMA, or their WiSE-FT interpolation."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

from tlkit.soup import interpolate

if TYPE_CHECKING:
    from tlkit._protocols import Run

__all__ = ["capture_anchor", "shipped_module"]


def _base(tuner: Run) -> nn.Module:
    return tuner.ema.module if tuner.ema is not None else tuner.model


def capture_anchor(tuner: Run, index: int) -> None:
    """With ``TrainConfig.wise_ft``, keep the weights at the start of the first phase boundary
    (the end of the head-only phase: the linear probe) as the WiSE-FT anchor, once."""
    bounds = tuner.policy.boundaries()
    if tuner.config.wise_ft is None or tuner.wise_anchor is not None or not bounds or index != bounds[0]:
        return
    tuner.wise_anchor = {k: v.detach().to("cpu", copy=True) for k, v in _base(tuner).state_dict().items()}


def shipped_module(tuner: Run) -> nn.Module:
    """The module whose weights are validated, written to checkpoints and kept after fit.

    The EMA of the weights if ``ema_decay`` is set, else the model; with ``wise_ft`` and an
    anchor captured, a copy holding ``(1 - wise_ft) * anchor + wise_ft * those weights``
    (`tlkit.soup.interpolate`), rebuilt at each call.
    """
    base = _base(tuner)
    if tuner.wise_anchor is None:
        return base
    if tuner.wise_twin is None:
        tuner.wise_twin = copy.deepcopy(base)
    tuner.wise_twin.load_state_dict(interpolate(tuner.wise_anchor, base.state_dict(), tuner.config.wise_ft))
    return tuner.wise_twin.eval()
