"""Logger callbacks: CSV, TensorBoard and MLflow (see `tlkit.callbacks`)."""

from __future__ import annotations

from collections.abc import Sequence

from tlkit.callbacks import Callback

__all__ = ["logger_callbacks"]


def logger_callbacks(names: Sequence[str]) -> list[Callback]:
    """The logger callbacks ``TrainConfig.loggers`` names, in that order."""
    raise NotImplementedError("loggers are being written")
