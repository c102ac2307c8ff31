"""The learning-rate range test (Smith, 2017, "Cyclical Learning Rates"; fastai's ``lr_find``).

Train for up to ``num_steps`` mini-batches while the learning rate grows exponentially from
``start_lr`` to ``end_lr``, record the (exponentially smoothed) loss, stop once it exceeds
``diverge`` times its minimum, and restore the model.

The suggestion follows fastai's ``valley`` rule (fastai 2.4+): drop the first tenth of the sweep
(the smoothed loss is still warming up there) and the last few points (where it blows up),
find the longest valley of the smoothed loss (its longest decreasing subsequence), and take the
point about half way down it. Unlike the steepest single slope, this survives noise (one lucky
batch makes no valley) and a flat start (a flat stretch is no valley). When the loss never
falls, there is no suggestion; when the valley touches either end of the sweep, the result
warns that the range was too narrow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LRFinderResult", "valley"]

MIN_DROP = 0.02  # a valley must lower the smoothed loss by 2% of its value, else the curve is flat
EDGE = 0.1  # a suggestion in the first or last tenth of the sweep (log scale) sits at its edge


def _longest_valley(losses: list[float]) -> tuple[int, int]:
    """``(start, end)`` of the longest strictly decreasing subsequence of ``losses`` (O(n^2), n <= a few hundred)."""
    n = len(losses)
    length, before = [1] * n, list(range(n))
    for i in range(n):
        for j in range(i):
            if losses[j] > losses[i] and length[j] + 1 > length[i]:
                length[i], before[i] = length[j] + 1, j
    end = max(range(n), key=lambda i: (length[i], -i))  # the longest; the earliest of equals
    start = end
    while before[start] != start:
        start = before[start]
    return start, end


def valley(lrs: list[float], losses: list[float]) -> tuple[int | None, str | None]:
    """The index of the suggested learning rate in ``lrs`` (fastai's valley rule), and a warning.

    Args:
        lrs: increasing learning rates.
        losses: the smoothed loss at each of them.

    Returns:
        ``(index, warning)``: ``index`` is ``None`` when fewer than 5 points ran or the loss never
        fell by `MIN_DROP` of its value; ``warning`` (or ``None``) says why a suggestion is
        missing or sits at an edge of the sweep.
    """
    n = len(lrs)
    if n < 5:
        return None, "fewer than 5 steps ran: no suggestion"
    lo, hi = n // 10, max(n // 10 + 2, n - max(1, n // 20))  # trim the warm-up and the blow-up
    start, end = _longest_valley(losses[lo:hi])
    start, end = start + lo, end + lo
    if end - start < 2 or losses[start] - losses[end] < MIN_DROP * abs(losses[start]):
        return None, ("the loss did not fall over the sweep: no suggestion; widen the range "
                      "(a larger end_lr) or run more steps")
    index = start + (end - start) // 2
    span = math.log(lrs[-1] / lrs[0]) or 1.0
    where = math.log(lrs[index] / lrs[0]) / span
    if where < EDGE or where > 1 - EDGE or end >= hi - 1:
        side = "lower" if where < 0.5 else "upper"
        return index, (f"the suggestion {lrs[index]:.2e} sits at the {side} edge of the sweep "
                       f"({lrs[0]:.1e} to {lrs[-1]:.1e}); widen the range to be sure")
    return index, None


@dataclass
class LRFinderResult:
    """What `tlkit.FineTuner.lr_find` measured.

    Attributes:
        lrs: the head group's learning rate at each step (other groups use it times their
            ``lr_scale``), increasing.
        losses: the smoothed training loss at each step (bias-corrected EMA, as fastai).
        raw_losses: the loss of each mini-batch.
        suggestion: the learning rate half way down the longest valley of ``losses`` (`valley`);
            ``None`` if fewer than 5 steps ran or the loss never fell.
        warning: why there is no suggestion, or that it sits at an edge of the sweep; else ``None``.
        diverged: ``True`` if the sweep stopped early because the loss blew up.
        loss_scale: the GradScaler's final scale under float16 autocast (the sweep runs
            through the same train step as `FineTuner.fit`), else ``None``.
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float] = field(default_factory=list)
    suggestion: float | None = None
    diverged: bool = False
    loss_scale: float | None = None
    warning: str | None = None

    def suggest(self) -> float | None:
        """Set and return `suggestion` (and `warning`) from ``lrs`` and ``losses`` (`valley`)."""
        index, self.warning = valley(self.lrs, self.losses)
        self.suggestion = self.lrs[index] if index is not None else None
        return self.suggestion

    @staticmethod
    def steepest(lrs: list[float], losses: list[float]) -> float | None:
        """The learning rate where ``losses`` falls fastest against ``log(lr)``, before its minimum.

        fastai's older ``steep`` rule, kept for comparison; `suggest` uses `valley`.
        """
        if len(lrs) < 5:
            return None
        stop = min(range(len(losses)), key=losses.__getitem__)
        best, best_slope = None, math.inf
        for i in range(1, max(stop, 2)):
            slope = (losses[i + 1] - losses[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
            if slope < best_slope:
                best, best_slope = lrs[i], slope
        return best

    def plot(self, path: str | Path | None = None) -> Any:
        """Loss against learning rate (log scale), the suggestion marked.

        Args:
            path: also save the figure here (PNG, SVG, PDF... by suffix).

        Returns:
            The matplotlib ``Figure``.

        Raises:
            ImportError: matplotlib is not installed (a tlkit dependency; ``pip install matplotlib``).
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("LRFinderResult.plot needs matplotlib: pip install matplotlib") from e
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.losses, label="smoothed loss")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (head group)")
        ax.set_ylabel("training loss")
        if self.suggestion is not None:
            ax.axvline(self.suggestion, color="tab:red", linestyle="--", label=f"valley: {self.suggestion:.2e}")
        ax.legend()
        ax.set_title("learning-rate range test")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig
