"""Where a classifier goes wrong: its worst photos and the classes it confuses (fastai's interpretation).

`top_losses` scores every photo of a dataset and returns those with the highest loss (the true
class given the lowest probability), `most_confused` reads the pairs of classes mixed up most
often from a confusion matrix, and `plot_top_losses` draws the worst photos in a grid with their
true and predicted class. `FineTuner.fit` writes ``top_losses.png`` into the run folder for a
single-label run with a validation folder (after fastai's ``ClassificationInterpretation``:
``plot_top_losses`` and ``most_confused``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tlkit._protocols import Run

__all__ = ["TopLoss", "most_confused", "plot_top_losses", "top_losses"]


@dataclass(frozen=True)
class TopLoss:
    """One photo the model got most wrong.

    Attributes:
        path: the file.
        true: its class.
        predicted: the model's class.
        probability: the probability the model gave the true class.
        loss: ``-log(probability)``, nats.
    """

    path: str
    true: str
    predicted: str
    probability: float
    loss: float


def top_losses(tuner: Run, data: Any, k: int = 9) -> list[TopLoss]:
    """The ``k`` photos of ``data`` (an `ImageFolderDataset` with the tuner's classes) with the highest loss.

    Returns:
        Highest loss first.

    Raises:
        ValueError: a multi-label model (its loss is not one class's probability).
    """
    if tuner.multilabel:
        raise ValueError("top_losses: a multi-label model has no single true class per photo")
    paths = [str(p) for p, _ in data.samples]
    truth = {str(p): y for p, y in data.samples}
    scored = []
    for p in tuner.predict(paths, on_error="skip"):
        true = tuner.classes[truth[p.path]]
        q = max(p.probabilities[true], 1e-12)
        scored.append(TopLoss(p.path, true, p.label, p.probabilities[true], -math.log(q)))
    return sorted(scored, key=lambda t: -t.loss)[:k]


def most_confused(matrix: torch.Tensor | list[list[int]], classes: list[str], min_count: int = 1) -> list[tuple[str, str, int]]:
    """``(true class, predicted class, count)`` of the off-diagonal cells with at least ``min_count``
    photos, most frequent first (fastai's ``most_confused``)."""
    m = torch.as_tensor(matrix)
    pairs = [(classes[i], classes[j], int(m[i, j])) for i in range(len(classes)) for j in range(len(classes))
             if i != j and int(m[i, j]) >= min_count]
    return sorted(pairs, key=lambda t: (-t[2], t[0], t[1]))


def plot_top_losses(items: list[TopLoss], path: str | Path, columns: int = 3, side: int = 200) -> Path:
    """Draw ``items`` in a grid PNG: each photo with ``true / predicted / probability of true / loss``.

    Raises:
        ImportError: matplotlib is missing.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import io

    import matplotlib.pyplot as plt

    from tlkit._fs import atomic_write_bytes
    from tlkit._text import escape_control
    from tlkit.images import load_image

    rows = max(1, math.ceil(len(items) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * side / 80, rows * (side + 40) / 80), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        image = load_image(item.path, draft_size=side)
        image.thumbnail((side, side))
        ax.imshow(image)
        ax.set_title(f"{escape_control(item.true)} / {escape_control(item.predicted)}\n"
                     f"p(true) {item.probability:.2f}, loss {item.loss:.2f}", fontsize=8)
    fig.suptitle("top losses: true / predicted", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())
