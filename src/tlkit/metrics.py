"""Classification metrics: top-1, per-class recall, macro-F1 from a confusion matrix; mAP and F1 for multi-label."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ClassificationMetrics", "MultiLabelMetrics", "average_precision", "confusion_matrix", "tune_thresholds"]


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


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float | None:
    """Average precision of one label: the area under its precision-recall steps.

    ``sum_n (R_n - R_{n-1}) P_n`` over the distinct scores, highest first (scikit-learn's
    ``average_precision_score``, ties counted together). ``None`` when the label has no positive.
    """
    y = positives.double().flatten()
    if y.sum() == 0:
        return None
    order = torch.argsort(scores.double().flatten(), descending=True, stable=True)
    s, y = scores.double().flatten()[order], y[order]
    tp = torch.cumsum(y, 0)
    last = torch.cat([s[1:] != s[:-1], torch.tensor([True])])  # the last index of each distinct score
    tp, count = tp[last], torch.arange(1, len(s) + 1, dtype=torch.float64)[last]
    precision, recall = tp / count, tp / y.sum()
    previous = torch.cat([torch.zeros(1, dtype=torch.float64), recall[:-1]])
    return float(((recall - previous) * precision).sum())


def tune_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per label, the probability threshold that maximises its F1 on these (validation) outputs.

    A label is predicted when its probability is at least its threshold. Candidates are the
    label's probabilities themselves; among equal F1 the highest threshold wins (fewer false
    positives). A label without a positive here keeps 0.5.

    Args:
        probs: float ``(N, C)`` sigmoid probabilities.
        targets: ``(N, C)`` 0/1.
    """
    out = []
    for c in range(probs.shape[1]):
        p, y = probs[:, c].double(), targets[:, c].double()
        if y.sum() == 0:
            out.append(0.5)
            continue
        best, best_f1 = 0.5, -1.0
        for t in torch.unique(p).tolist():
            pred = p >= t
            tp = float((pred * y).sum())
            f1 = 2 * tp / (float(pred.sum()) + float(y.sum()))
            if f1 >= best_f1:
                best, best_f1 = t, f1
        out.append(float(best))
    return out


@dataclass
class MultiLabelMetrics:
    """Metrics of one evaluation pass of a multi-label classifier (sigmoid outputs).

    Attributes:
        classes: label names in index order.
        probs: float32 ``(N, C)`` sigmoid probabilities.
        targets: float32 ``(N, C)`` 0/1 ground truth.
        thresholds: a label is predicted when its probability is at least its threshold.
        loss: mean binary cross-entropy per image (summed over labels), if computed.

    mAP is the mean of `average_precision` over the labels with a positive; F1 per label at its
    threshold; macro-F1 their mean (labels present in targets or predictions), micro-F1 over
    every (image, label) decision: scikit-learn's ``f1_score(average="macro" / "micro")``.
    """

    classes: list[str]
    probs: torch.Tensor
    targets: torch.Tensor
    thresholds: list[float]
    loss: float | None = None

    @property
    def n(self) -> int:
        """Number of images."""
        return int(self.targets.shape[0])

    @property
    def predicted(self) -> torch.Tensor:
        """The 0/1 decisions ``(N, C)``: probability at least the label's threshold."""
        return (self.probs >= torch.tensor(self.thresholds, dtype=self.probs.dtype)).to(torch.float64)

    @property
    def per_label_ap(self) -> dict[str, float | None]:
        """`average_precision` of each label, ``None`` where it has no positive."""
        return {c: average_precision(self.probs[:, i], self.targets[:, i]) for i, c in enumerate(self.classes)}

    @property
    def map(self) -> float:
        """Mean average precision over the labels with a positive (0 if none has)."""
        aps = [v for v in self.per_label_ap.values() if v is not None]
        return sum(aps) / len(aps) if aps else 0.0

    def _counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pred, y = self.predicted, self.targets.double()
        return (pred * y).sum(0), pred.sum(0), y.sum(0)

    @property
    def per_label_f1(self) -> dict[str, float | None]:
        """F1 of each label at its threshold, ``None`` where it is neither true nor predicted."""
        tp, predicted, support = self._counts()
        return {c: (2 * float(tp[i]) / float(predicted[i] + support[i]) if predicted[i] + support[i] else None)
                for i, c in enumerate(self.classes)}

    @property
    def macro_f1(self) -> float:
        """Mean F1 over the labels present in targets or predictions."""
        values = [v for v in self.per_label_f1.values() if v is not None]
        return sum(values) / len(values) if values else 0.0

    @property
    def micro_f1(self) -> float:
        """F1 over every (image, label) decision."""
        tp, predicted, support = (float(v.sum()) for v in self._counts())
        return 2 * tp / (predicted + support) if predicted + support else 0.0

    @property
    def support(self) -> dict[str, int]:
        """Number of images with each label."""
        return {c: int(v) for c, v in zip(self.classes, self.targets.sum(0))}

    def to_dict(self) -> dict:
        """JSON-ready: ``n``, ``map``, ``macro_f1``, ``micro_f1``, ``per_label_ap``, ``per_label_f1``,
        ``thresholds``, ``support``, ``classes`` (+ ``loss``)."""
        out = {"n": self.n, "map": self.map, "macro_f1": self.macro_f1, "micro_f1": self.micro_f1,
               "per_label_ap": self.per_label_ap, "per_label_f1": self.per_label_f1,
               "thresholds": dict(zip(self.classes, self.thresholds)), "support": self.support,
               "classes": list(self.classes)}
        if self.loss is not None:
            out["loss"] = self.loss
        return out
