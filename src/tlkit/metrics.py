"""Classification metrics from a confusion matrix: top-1, per-class recall, macro-F1."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ClassificationMetrics", "confusion_matrix"]


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts ``(num_classes, num_classes)`` int64; row = true class, column = predicted class."""
    targets = torch.as_tensor(targets, dtype=torch.int64).flatten()
    preds = torch.as_tensor(preds, dtype=torch.int64).flatten()
    idx = targets * num_classes + preds
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass
class ClassificationMetrics:
    """Metrics of one evaluation pass.

    Attributes:
        classes: class names in index order.
        matrix: confusion matrix ``(C, C)`` int64, rows true, columns predicted.
        loss: mean cross-entropy per image (nats), if computed.

    Per-class recall of a class absent from the targets is ``None``. Macro-F1 averages the F1 of
    every class present in the targets or the predictions, with F1 = 0 where precision + recall
    is 0, the same as scikit-learn's ``f1_score(average="macro")`` with its default labels.
    """

    classes: list[str]
    matrix: torch.Tensor
    loss: float | None = None

    @classmethod
    def from_predictions(
        cls, targets: Sequence[int] | torch.Tensor, preds: Sequence[int] | torch.Tensor,
        classes: Sequence[str], loss: float | None = None,
    ) -> ClassificationMetrics:
        """Build from true and predicted class indices."""
        return cls(list(classes), confusion_matrix(torch.as_tensor(targets), torch.as_tensor(preds), len(classes)), loss)

    @property
    def n(self) -> int:
        """Number of images."""
        return int(self.matrix.sum())

    @property
    def top1(self) -> float:
        """Fraction of images whose top prediction is right, in [0, 1]."""
        return float(self.matrix.diag().sum()) / max(self.n, 1)

    @property
    def per_class_recall(self) -> dict[str, float | None]:
        """Recall of each class, ``None`` where the class has no image."""
        support = self.matrix.sum(1)
        return {c: (float(self.matrix[i, i]) / float(support[i]) if support[i] else None)
                for i, c in enumerate(self.classes)}

    @property
    def per_class_precision(self) -> dict[str, float | None]:
        """Precision of each class, ``None`` where nothing was predicted as that class."""
        predicted = self.matrix.sum(0)
        return {c: (float(self.matrix[i, i]) / float(predicted[i]) if predicted[i] else None)
                for i, c in enumerate(self.classes)}

    @property
    def per_class_f1(self) -> dict[str, float | None]:
        """F1 of each class (``2 tp / (support + predicted)``), ``None`` where both are 0."""
        tp, support, predicted = self.matrix.diag(), self.matrix.sum(1), self.matrix.sum(0)
        return {c: (2 * float(tp[i]) / float(support[i] + predicted[i]) if support[i] + predicted[i] else None)
                for i, c in enumerate(self.classes)}

    @property
    def support(self) -> dict[str, int]:
        """Number of images of each class."""
        return {c: int(v) for c, v in zip(self.classes, self.matrix.sum(1))}

    @property
    def macro_f1(self) -> float:
        """Unweighted mean F1 over the classes present in targets or predictions."""
        tp = self.matrix.diag().double()
        support = self.matrix.sum(1).double()
        predicted = self.matrix.sum(0).double()
        present = (support + predicted) > 0
        if not present.any():
            return 0.0
        f1 = torch.where(support + predicted > 0, 2 * tp / (support + predicted).clamp_min(1), torch.zeros_like(tp))
        return float(f1[present].mean())

    def to_dict(self) -> dict:
        """JSON-ready: ``n``, ``top1``, ``macro_f1``, ``per_class_recall``, ``confusion_matrix``, ``classes`` (+ ``loss``)."""
        out = {
            "n": self.n,
            "top1": self.top1,
            "macro_f1": self.macro_f1,
            "per_class_recall": self.per_class_recall,
            "confusion_matrix": self.matrix.tolist(),
            "classes": list(self.classes),
        }
        if self.loss is not None:
            out["loss"] = self.loss
        return out
