"""Evaluation and prediction on one forward path (plain or test-time augmented)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from tlkit._runtime import Runtime, eval_mode
from tlkit._text import escape_control
from tlkit.distributed import all_reduce_sum
from tlkit.images import SkippedImageWarning, expand_image_paths, load_image, to_rgb
from tlkit.metrics import ClassificationMetrics, MultiLabelMetrics
from tlkit.tta import tta_log_probs

__all__ = ["Prediction", "prepare_input", "log_probs", "evaluate_loader", "classify", "error_handler", "predict_batches", "predict_items"]


@dataclass
class Prediction:
    """The prediction for one image.

    Attributes:
        label: the most probable class name.
        index: its class index.
        probability: its softmax probability, in [0, 1].
        probabilities: every class name with its probability (sums to 1).
        top: the ``top_k`` most probable ``(class name, probability)`` pairs, most probable first
            (every class when `FineTuner.predict` got no ``top_k``).
        path: the file the image came from, ``None`` for a PIL image or a tensor.
        sure: ``False`` when ``probability`` is below the reject threshold fitted on the validation
            split (`tlkit.calibration`); then `answer` is ``"not sure"``.
        labels: a multi-label model's answer: every label at or above its threshold (tuned on the
            validation split), in class order; ``None`` for single-label.
            ``probabilities`` are then independent sigmoid outputs (they need not sum to 1).
    """

    label: str
    index: int
    probability: float
    probabilities: dict[str, float]
    top: list[tuple[str, float]] = field(default_factory=list)
    path: str | None = None
    sure: bool = True
    labels: list[str] | None = None

    @property
    def answer(self) -> str:
        """``label``, or ``"not sure"`` when the probability is below the checkpoint's reject threshold."""
        return self.label if self.sure else "not sure"


def log_probs(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, runtime: Runtime,
              tta: str = "none") -> torch.Tensor:
    """Log-softmax probabilities, float32 ``(B, num_classes)``, of images ``x`` float32 ``(B, 3, H, W)``.

    With ``tta`` other than ``"none"`` the probabilities are averaged over the views of
    `tlkit.tta_views` first.
    """
    x = runtime.to_device(x)
    with runtime.autocast():
        if tta == "none":
            return forward(x).float().log_softmax(1)
        return tta_log_probs(forward, x, tta).float()


@torch.no_grad()
def evaluate_loader(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], loader: Any,
                    classes: Sequence[str], runtime: Runtime, *, sharded: bool = False, tta: str = "none",
                    progress: bool = False, outputs: list[torch.Tensor] | None = None,
                    multilabel: bool = False) -> ClassificationMetrics | MultiLabelMetrics:
    """Metrics of ``forward`` over ``loader`` with ``model`` in eval mode (restored after, also on errors).

    The loss is the mean negative log-likelihood (cross-entropy; of the averaged probabilities
    under TTA). ``sharded``: the loader covers this rank's shard, so counts are summed over ranks.
    ``outputs``: if given, receives this process's float32 log-probabilities ``(N, C)`` and
    labels ``(N,)``, CPU (what `tlkit.calibration` fits on). ``multilabel``: sigmoid outputs and
    multi-hot targets, scored as `MultiLabelMetrics` at thresholds 0.5 (the loop tunes them).

    Raises:
        ValueError: the data is empty.
    """
    if multilabel:
        return _evaluate_multilabel(model, forward, loader, classes, runtime, sharded=sharded, progress=progress)
    preds, targets, loss_sum, kept = [], [], 0.0, []
    with eval_mode(model):
        for batch in tqdm(loader, desc="evaluate", leave=False, disable=None if progress else True):
            if batch is None:  # every file of the batch failed to load
                continue
            x, y = batch
            y = y.to(runtime.device)
            lp = log_probs(forward, x, runtime, tta)
            loss_sum += nn.functional.nll_loss(lp, y, reduction="sum").item()
            preds.append(lp.argmax(1).cpu())
            targets.append(y.cpu())
            if outputs is not None:
                kept.append(lp.cpu())
    if outputs is not None:
        outputs += [torch.cat(kept) if kept else torch.zeros(0, len(classes)),
                    torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)]
    t = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    p = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    m = ClassificationMetrics.from_predictions(t, p, list(classes))
    if sharded:  # counts summed over ranks: exactly the one-process metrics
        matrix, total = all_reduce_sum(m.matrix, loss_sum)
        m = ClassificationMetrics(list(classes), matrix.round().long(), None)
        loss_sum = float(total)
    if m.n == 0:
        raise ValueError("evaluation data is empty")
    m.loss = loss_sum / m.n
    return m


@torch.no_grad()
def _evaluate_multilabel(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], loader: Any,
                         classes: Sequence[str], runtime: Runtime, *, sharded: bool,
                         progress: bool) -> MultiLabelMetrics:
    """`evaluate_loader` for multi-label data: every probability kept (mAP needs them), BCE as the loss."""
    probs, targets = [], []
    with eval_mode(model):
        for batch in tqdm(loader, desc="evaluate", leave=False, disable=None if progress else True):
            if batch is None:
                continue
            x, y = batch
            with runtime.autocast():
                logits = forward(runtime.to_device(x)).float()
            probs.append(logits.sigmoid().cpu())
            targets.append(y.float().cpu())
    p = torch.cat(probs) if probs else torch.zeros(0, len(classes))
    y = torch.cat(targets) if targets else torch.zeros(0, len(classes))
    if sharded:  # every rank needs every output for average precision
        from tlkit.distributed import all_gather_object

        gathered = all_gather_object((p, y))
        p, y = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
    if len(y) == 0:
        raise ValueError("evaluation data is empty")
    eps = 1e-7
    loss = float(-(y * (p + eps).log() + (1 - y) * (1 - p + eps).log()).sum(1).mean())
    return MultiLabelMetrics(list(classes), p, y, [0.5] * len(classes), loss)


@torch.no_grad()
def classify(model: nn.Module, x: torch.Tensor, classes: Sequence[str], runtime: Runtime,
             tta: str = "none", top_k: int | None = None, calibration: dict[str, float] | None = None,
             thresholds: list[float] | None = None) -> list[Prediction]:
    """One `Prediction` per image of ``x`` float32 ``(B, 3, H, W)``, normalised by the data config.

    ``calibration``: ``{"temperature": T, "reject_threshold": t}`` (`tlkit.calibration`): the
    logits are divided by ``T`` before the softmax, and predictions below ``t`` are not `sure`.
    ``thresholds``: a multi-label model: sigmoid probabilities, and `Prediction.labels` lists
    the labels at or above their threshold.
    """
    if thresholds is not None:
        return _classify_multilabel(model, x, classes, runtime, tta, top_k, thresholds)
    t = (calibration or {}).get("temperature", 1.0)
    threshold = (calibration or {}).get("reject_threshold")
    forward = model if t == 1.0 else (lambda z: model(z) / t)
    with eval_mode(model):
        probs = log_probs(forward, x, runtime, tta).exp().cpu()
    out = []
    k_top = len(classes) if top_k is None else min(top_k, len(classes))
    for row in probs:
        k = int(row.argmax())
        values, indices = row.topk(k_top)
        top = [(classes[int(i)], float(v)) for v, i in zip(values, indices)]
        sure = threshold is None or float(row[k]) >= threshold
        out.append(Prediction(classes[k], k, float(row[k]), {c: float(v) for c, v in zip(classes, row)}, top,
                              sure=sure))
    return out


def _classify_multilabel(model: nn.Module, x: torch.Tensor, classes: Sequence[str], runtime: Runtime, tta: str,
                         top_k: int | None, thresholds: list[float]) -> list[Prediction]:
    """`classify` for a multi-label model: independent sigmoid probabilities (TTA averages them)."""
    from tlkit.tta import tta_views

    with eval_mode(model), runtime.autocast():
        views = tta_views(runtime.to_device(x), tta) if tta != "none" else [runtime.to_device(x)]
        probs = torch.stack([model(v).float().sigmoid() for v in views]).mean(0).cpu()
    out = []
    k_top = len(classes) if top_k is None else min(top_k, len(classes))
    for row in probs:
        k = int(row.argmax())
        values, indices = row.topk(k_top)
        above = [c for c, p, t in zip(classes, row.tolist(), thresholds) if p >= t]
        out.append(Prediction(classes[k], k, float(row[k]), {c: float(v) for c, v in zip(classes, row)},
                              [(classes[int(i)], float(v)) for v, i in zip(values, indices)], labels=above))
    return out


ErrorHandler = Callable[[str, str], None]
"""Called with ``(path, message)`` for each input that could not be read."""


def predict_items(inputs: Any) -> list[Any]:
    """`FineTuner.predict`'s inputs as a flat list: folders and globs expanded, a batch tensor split."""
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
        return list(inputs)
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    out: list[Any] = []
    for item in items:
        out += expand_image_paths([item]) if isinstance(item, (str, Path)) else [item]
    return out


def error_handler(on_error: str | Callable[[str, str], None]) -> Callable[[str, str], None] | None:
    """``on_error`` of `FineTuner.predict` as a callable, ``None`` for "raise"."""
    if callable(on_error):
        return on_error
    if on_error == "raise":
        return None
    if on_error == "skip":
        def warn(path: str, message: str) -> None:
            warnings.warn(f"skipped: {escape_control(message)}", SkippedImageWarning, stacklevel=4)
        return warn
    raise ValueError(f"on_error must be 'skip', 'raise' or a callable, got {on_error!r}")


def _read_chunk(chunk: list[Any], prepare: Callable[[Any], torch.Tensor],
                on_error: ErrorHandler | None) -> tuple[torch.Tensor | None, list[int]]:
    """The inputs of ``chunk`` that could be read, stacked, and their positions in ``chunk``.

    Raises:
        BadImageError / OSError: an unreadable file when ``on_error`` is ``None``.
    """
    from tlkit.images import BadImageError

    tensors, kept = [], []
    for i, item in enumerate(chunk):
        try:
            tensors.append(prepare(item))
            kept.append(i)
        except (BadImageError, OSError) as e:
            if on_error is None:
                raise
            on_error(str(item), str(e))
    return (torch.stack(tensors) if tensors else None), kept


def _source(item: Any) -> str | None:
    return str(item) if isinstance(item, (str, Path)) else None


def predict_batches(model: nn.Module, items: list[Any], prepare: Callable[[Any], torch.Tensor],
                    classes: Sequence[str], runtime: Runtime, batch_size: int, *, tta: str = "none",
                    progress: bool = False, top_k: int | None = None,
                    on_error: ErrorHandler | None = None, calibration: dict[str, float] | None = None,
                    thresholds: list[float] | None = None) -> list[Prediction]:
    """Predictions for ``items`` in order, decoding the next batch in a thread while the model runs.

    PIL's decoders and resize release the GIL. With ``on_error`` ``None`` an unreadable file
    raises from ``result()`` in input order, so the error names the first bad file; otherwise
    ``on_error(path, message)`` is called for it and it gets no prediction.
    """
    from concurrent.futures import ThreadPoolExecutor

    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    out: list[Prediction] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_read_chunk, chunks[0], prepare, on_error) if chunks else None
        for k in tqdm(range(len(chunks)), desc="predict", unit="batch", leave=False,
                      disable=None if progress and len(chunks) >= 2 else True):
            x, kept = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(_read_chunk, chunks[k + 1], prepare, on_error)
            if x is not None:
                preds = classify(model, x, classes, runtime, tta, top_k, calibration, thresholds)
                out += [replace(p, path=_source(chunks[k][i])) for p, i in zip(preds, kept)]
    return out


def prepare_input(item: Any, transform: Callable[[Image.Image], torch.Tensor], draft_size: int | None,
                  max_pixels: int | None, max_bytes: int | None) -> torch.Tensor:
    """One model input, float32 ``(3, H, W)``: a file or PIL image through ``transform``, a tensor as is.

    Raises:
        BadImageError: an unreadable file, or one over ``max_pixels`` / ``max_bytes``.
        TypeError: an unsupported input type.
    """
    if isinstance(item, (str, Path)):
        return transform(load_image(item, max_pixels=max_pixels, max_bytes=max_bytes, draft_size=draft_size))
    if isinstance(item, Image.Image):
        return transform(to_rgb(item))
    if isinstance(item, torch.Tensor) and item.ndim == 3:
        return item
    raise TypeError(f"cannot predict on {type(item).__name__}: pass paths, PIL images or (3, H, W) / (B, 3, H, W) tensors")
