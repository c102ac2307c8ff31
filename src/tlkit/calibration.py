"""Say when unsure: temperature scaling, expected calibration error, and a reject threshold.

A classifier's softmax "probabilities" are usually over-confident, most of all on photos unlike
its training ones. `fit_temperature` finds the one number ``T`` that makes ``softmax(logits / T)``
as honest as possible on validation photos (temperature scaling, Guo et al., "On Calibration of
Modern Neural Networks", ICML 2017: the NLL-optimal ``T``; top-1 is unchanged). `expected_calibration_error`
measures what is left (ECE, 15 equal-width bins as in Guo et al.). `reject_threshold` is the
calibrated confidence below which a prediction says "not sure": the confidence of the least
confident of the `REJECT_COVERAGE` most confident validation photos, so that about that share of
photos like the validation ones get an answer.

`FineTuner.fit` does all three on its validation split at every epoch (``record["temperature"]``,
``["ece"]``, ``["reject_threshold"]``) and each checkpoint carries its epoch's values;
`FineTuner.predict` divides the logits by the temperature and marks predictions below the
threshold (`Prediction.sure`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["REJECT_COVERAGE", "calibration_summary", "expected_calibration_error", "fit_temperature",
           "reject_threshold"]

REJECT_COVERAGE = 0.8
"""Share of validation photos the reject threshold lets through (`reject_threshold`)."""

T_MIN, T_MAX = 0.05, 20.0
"""Bounds of a temperature, fitted or read from a checkpoint."""


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    Args:
        logits: float ``(N, C)``; log-probabilities work as well (a softmax is shift-invariant).
        labels: int64 ``(N,)``.
        max_iter: L-BFGS iterations on ``log T``.

    Returns:
        ``T`` in [`T_MIN`, `T_MAX`]: above 1 softens an over-confident model, below 1 sharpens an
        under-confident one (label smoothing makes models under-confident).
    """
    z, y = logits.detach().double().cpu(), labels.detach().long().cpu()
    if len(y) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, T_MIN), T_MAX) if math.isfinite(t) else 1.0


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins.

    Args:
        probs: float ``(N, C)`` probabilities (rows sum to 1).
        labels: int64 ``(N,)``.
        bins: number of bins over (0, 1].

    Returns:
        ``sum_b |acc_b - conf_b| * n_b / N``, in [0, 1]; 0 for empty data.
    """
    if len(labels) == 0:
        return 0.0
    conf, pred = probs.float().max(1)
    right = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += float(inside.float().mean() * (right[inside].mean() - conf[inside].mean()).abs())
    return total


def reject_threshold(probs: torch.Tensor, coverage: float = REJECT_COVERAGE) -> float:
    """The confidence at which ``coverage`` of these predictions are at least as confident.

    Args:
        probs: float ``(N, C)`` calibrated probabilities of validation photos.
        coverage: share of photos to answer, in (0, 1].

    Returns:
        A threshold in [0, 1] (0 for empty data: everything is answered).
    """
    if len(probs) == 0:
        return 0.0
    conf = probs.float().max(1).values.sort(descending=True).values
    k = max(1, math.ceil(coverage * len(conf)))
    return float(conf[k - 1])


def calibration_summary(log_probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``temperature``, ``ece_raw`` (before), ``ece`` (after) and ``reject_threshold`` of validation outputs.

    Args:
        log_probs: float ``(N, C)`` log-softmax outputs of the validation photos.
        labels: int64 ``(N,)``.
    """
    t = fit_temperature(log_probs, labels)
    calibrated = (log_probs.double() / t).softmax(1)
    return {"temperature": t, "ece_raw": expected_calibration_error(log_probs.exp(), labels),
            "ece": expected_calibration_error(calibrated, labels), "reject_threshold": reject_threshold(calibrated)}
