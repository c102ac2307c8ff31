"""The learning-rate range test (Smith, 2017, "Cyclical Learning Rates"; fastai's ``lr_find``).

Train for up to ``num_steps`` mini-batches while the learning rate grows exponentially from
``start_lr`` to ``end_lr``, record the (exponentially smoothed) loss, stop once it exceeds
``diverge`` times its minimum, and restore the model. The suggestion is the learning rate
where the smoothed loss falls fastest against ``log(lr)`` (fastai's ``steep``), taken
before the loss minimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LRFinderResult"]


@dataclass
class LRFinderResult:
    """What `tlkit.FineTuner.lr_find` measured.

    Attributes:
        lrs: the head group's learning rate at each step (other groups use it times their
            ``lr_scale``), increasing.
        losses: the smoothed training loss at each step (bias-corrected EMA, as fastai).
        raw_losses: the loss of each mini-batch.
        suggestion: the learning rate of steepest descent of ``losses`` over ``log(lrs)``;
            ``None`` if fewer than 5 steps ran.
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

    @staticmethod
    def steepest(lrs: list[float], losses: list[float]) -> float | None:
        """The learning rate where ``losses`` falls fastest against ``log(lr)``, before its minimum."""
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
            ax.axvline(self.suggestion, color="tab:red", linestyle="--", label=f"steepest: {self.suggestion:.2e}")
        ax.legend()
        ax.set_title("learning-rate range test")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig
