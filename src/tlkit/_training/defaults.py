"""The callbacks `FineTuner.fit` runs: the built-ins a `TrainConfig` asks for, then the user's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tlkit.callbacks import Callback, CallbackList, EarlyStopping, EpochLogger, ProgressBar, RunReport, TimeBudget

if TYPE_CHECKING:
    from tlkit._protocols import Run

__all__ = ["default_callbacks"]


def default_callbacks(tuner: Run, user: Sequence[Callback] = ()) -> CallbackList:
    """The built-in callbacks a `TrainConfig` asks for, the user's, then the loggers, in that order.

    The loggers (``TrainConfig.loggers``) come last, so what a user's ``on_epoch_end`` adds to the
    epoch's record is in the same epoch's CSV row, TensorBoard step and MLflow metrics.
    """
    cfg = tuner.config
    built: list[Callback] = ([ProgressBar()] if cfg.bars else []) + ([EpochLogger()] if cfg.progress else [])
    if cfg.early_stopping_patience is not None:
        from tlkit._training.task import best_key

        built.append(EarlyStopping(cfg.early_stopping_patience, monitor=best_key(cfg, tuner.multilabel)))
    if cfg.time_budget is not None:
        built.append(TimeBudget(cfg.time_budget))
    built.append(RunReport())
    loggers: list[Callback] = []
    if getattr(cfg, "loggers", None):
        from tlkit.loggers import logger_callbacks  # optional packages: imported when asked for

        loggers = list(logger_callbacks(cfg.loggers))
    return CallbackList([*built, *user, *loggers])
