"""Evaluation and prediction on one forward path (plain or test-time augmented)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tlkit._training.runtime import Runtime, eval_mode
from tlkit.distributed import all_reduce_sum
from tlkit.metrics import ClassificationMetrics
from tlkit.tta import tta_log_probs

__all__ = ["Prediction", "log_probs", "evaluate_loader", "classify", "predict_batches"]


@dataclass
class Prediction:
    """The prediction for one image.

    Attributes:
        label: the most probable class name.
        index: its class index.
        probability: its softmax probability, in [0, 1].
        probabilities: every class name with its probability (sums to 1).
    """

    label: str
    index: int
    probability: float
    probabilities: dict[str, float]


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
                    progress: bool = False) -> ClassificationMetrics:
    """Metrics of ``forward`` over ``loader`` with ``model`` in eval mode (restored after, also on errors).

    The loss is the mean negative log-likelihood (cross-entropy; of the averaged probabilities
    under TTA). ``sharded``: the loader covers this rank's shard, so counts are summed over ranks.

    Raises:
        ValueError: the data is empty.
    """
    preds, targets, loss_sum = [], [], 0.0
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
def classify(model: nn.Module, x: torch.Tensor, classes: Sequence[str], runtime: Runtime,
             tta: str = "none") -> list[Prediction]:
    """One `Prediction` per image of ``x`` float32 ``(B, 3, H, W)``, normalised by the data config."""
    with eval_mode(model):
        probs = log_probs(model, x, runtime, tta).exp().cpu()
    out = []
    for row in probs:
        k = int(row.argmax())
        out.append(Prediction(classes[k], k, float(row[k]), {c: float(v) for c, v in zip(classes, row)}))
    return out


def predict_batches(model: nn.Module, items: list[Any], prepare: Callable[[Any], torch.Tensor],
                    classes: Sequence[str], runtime: Runtime, batch_size: int, *, tta: str = "none",
                    progress: bool = False) -> list[Prediction]:
    """Predictions for ``items`` in order, decoding the next batch in a thread while the model runs.

    PIL's decoders and resize release the GIL; an unreadable file raises from ``result()`` in
    input order, so the error names the first bad file.
    """
    from concurrent.futures import ThreadPoolExecutor

    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

    def stack(chunk: list[Any]) -> torch.Tensor:
        return torch.stack([prepare(it) for it in chunk])

    out: list[Prediction] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(stack, chunks[0]) if chunks else None
        for k in tqdm(range(len(chunks)), desc="predict", unit="batch", leave=False,
                      disable=None if progress and len(chunks) >= 2 else True):
            x = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(stack, chunks[k + 1])
            out += classify(model, x, classes, runtime, tta)
    return out
