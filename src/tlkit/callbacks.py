"""Callbacks: code that runs at named moments of `FineTuner.fit`, with state that resume restores.

Hooks, in the order they run (``epoch`` is the 1-based number of the epoch, the number its
record in ``FineTuner.history`` and ``metrics.jsonl`` carries)::

    on_fit_start(tuner, train, val)
      for each epoch:
        on_epoch_start(tuner, epoch)
        on_phase_start(tuner, epoch, joined)      # a FreezePolicy phase begins (not epoch 1)
        on_train_batch_end(tuner, loss, batch_size)   # after each optimizer step
        on_validation_end(tuner, metrics)         # when there is validation data
        on_epoch_end(tuner, record)               # before the epoch's files are written
        on_checkpoint_saved(tuner, paths)         # after them (with output_dir set)
    on_fit_end(tuner)

Rules (after Lightning's callbacks and fastai's ``Learner`` events):

* ``on_epoch_end`` runs before the resume state is written, so whatever a callback records
  there, in ``record`` (extra keys land in ``metrics.jsonl``) or in its own `Callback.state_dict`,
  survives a kill and a resume exactly. State changed in ``on_checkpoint_saved`` or
  ``on_fit_end`` is saved with the next epoch only.
* Setting ``tuner.should_stop = True`` (in any hook up to ``on_epoch_end``) ends training after
  the epoch; under torchrun the stop is taken when any rank asks for it.
* Callbacks run on every rank; write files only where ``tuner.is_main``.
* `Callback.state_dict` must hold tensors, numbers, strings, lists and dicts only: it is read
  back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from tlkit._protocols import Run
    from tlkit.metrics import ClassificationMetrics

__all__ = ["HOOKS", "improves", "Callback", "CallbackList", "EarlyStopping", "EpochLogger", "ProgressBar", "RunReport",
           "TimeBudget"]

HOOKS = ("on_fit_start", "on_epoch_start", "on_phase_start", "on_train_batch_end", "on_validation_end",
         "on_epoch_end", "on_checkpoint_saved", "on_fit_end")

_LOWER_IS_BETTER = {"val_loss", "train_loss"}


def improves(metric: str, value: float, best: float | None, mode: str | None = None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (``None``: nothing to beat yet).

    ``mode`` ``"min"`` / ``"max"``, or ``None`` for lower-is-better on losses and higher otherwise;
    the one rule for the best checkpoint and for `EarlyStopping`.
    """
    if best is None:
        return True
    lower = mode == "min" or (mode is None and metric in _LOWER_IS_BETTER)
    return value < best if lower else value > best


class Callback:
    """Base class: override the hooks you need (each receives the `FineTuner` first)."""

    @property
    def state_key(self) -> str:
        """The key of this callback's state in the resume state (default: the class name)."""
        return type(self).__qualname__

    def state_dict(self) -> dict[str, Any]:
        """State to save with each epoch (tensors, numbers, strings, lists, dicts); default none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, on resume (before ``on_fit_start``)."""

    def on_fit_start(self, tuner: Run, train: Any, val: Any) -> None:
        """Training begins (or resumes: ``tuner.epoch`` epochs are already done)."""

    def on_epoch_start(self, tuner: Run, epoch: int) -> None:
        """Epoch ``epoch`` (1-based) begins; the freeze policy has been applied."""

    def on_phase_start(self, tuner: Run, epoch: int, joined: list[str]) -> None:
        """A FreezePolicy phase begins at epoch ``epoch``; ``joined``: parameters that joined the optimizer."""

    def on_train_batch_end(self, tuner: Run, loss: float, batch_size: int) -> None:
        """An optimizer step was taken (``tuner.step`` counts it); ``loss``: its mean loss."""

    def on_validation_end(self, tuner: Run, metrics: ClassificationMetrics) -> None:
        """The epoch's validation finished."""

    def on_epoch_end(self, tuner: Run, record: dict[str, Any]) -> None:
        """The epoch's record is complete (and in ``tuner.history``); its files are not written yet."""

    def on_checkpoint_saved(self, tuner: Run, paths: dict[str, Path]) -> None:
        """The epoch's files were written: ``paths`` maps ``state``, ``last``, ``best``, ``metrics``."""

    def on_fit_end(self, tuner: Run) -> None:
        """Training finished (all epochs, or a stop); EMA weights, if any, are in ``tuner.model``."""


class CallbackList:
    """Calls a hook on every callback in order, and gathers their states by `Callback.state_key`."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def call(self, hook: str, *args: Any) -> None:
        """Run ``hook`` (one of `HOOKS`) on each callback."""
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def _keys(self) -> list[str]:
        keys, seen = [], {}
        for cb in self.callbacks:
            k = cb.state_key
            seen[k] = seen.get(k, 0) + 1
            keys.append(k if seen[k] == 1 else f"{k}#{seen[k]}")
        return keys

    def state_dict(self) -> dict[str, Any]:
        """``{state_key: state}`` of every callback with a non-empty state."""
        return {k: s for k, cb in zip(self._keys(), self.callbacks) if (s := cb.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Give each callback its saved state (callbacks without one are left as built)."""
        for k, cb in zip(self._keys(), self.callbacks):
            if k in state:
                cb.load_state_dict(state[k])


class ProgressBar(Callback):
    """A tqdm bar over each epoch's batches with the running loss (main process only)."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._sum, self._seen = 0.0, 0

    def on_epoch_start(self, tuner: Run, epoch: int) -> None:
        if tuner.is_main:
            self._bar = tqdm(total=tuner.steps_per_epoch, desc=f"epoch {epoch}/{tuner.config.epochs}", leave=False,
                             disable=None)  # None: a bar on a terminal only; pipes and files get the epoch lines
        self._sum, self._seen = 0.0, 0

    def on_train_batch_end(self, tuner: Run, loss: float, batch_size: int) -> None:
        if self._bar is not None:
            self._sum, self._seen = self._sum + loss * batch_size, self._seen + batch_size
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{self._sum / self._seen:.4f}")

    def on_epoch_end(self, tuner: Run, record: dict[str, Any]) -> None:
        self._close()

    def on_fit_end(self, tuner: Run) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class EpochLogger(Callback):
    """One line per epoch (losses, top-1, macro-F1, seconds; ``*best*``).

    The trainable parameter count is shown on the first line and whenever it changes (a phase
    boundary), so a redirected log stays short.
    """

    def __init__(self) -> None:
        self._trainable: int | None = None

    def on_epoch_end(self, tuner: Run, record: dict[str, Any]) -> None:
        if not tuner.is_main:
            return
        s = f"epoch {record['epoch']}/{tuner.config.epochs}  train_loss {record['train_loss']:.4f}"
        if "top1" in record:
            s += f"  val_loss {record['val_loss']:.4f}  top1 {record['top1']:.4f}  macro_f1 {record['macro_f1']:.4f}"
        elif "map" in record:
            s += f"  val_loss {record['val_loss']:.4f}  mAP {record['map']:.4f}  macro_f1 {record['macro_f1']:.4f}"
        if record["trainable_params"] != self._trainable:
            self._trainable = record["trainable_params"]
            s += f"  trainable {self._trainable:,}"
        s += f"  {record['seconds']:.1f}s"
        tqdm.write(s + ("  *best*" if tuner.best.get("epoch") == record["epoch"] else ""))


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs, counted from the last phase boundary.

    A newly unfrozen phase gets its own patience: its first epochs often score below the
    previous phase's best while the unfrozen stages adapt.

    Args:
        patience: epochs without improvement before stopping (``>= 1``).
        monitor: a key of the epoch record (``"top1"``, ``"macro_f1"``, ``"val_loss"``...);
            default ``TrainConfig.best_metric``.
        mode: ``"max"``, ``"min"``, or ``None`` for ``"min"`` on losses and ``"max"`` otherwise.
        verbose: print a line when stopping (main process, with ``TrainConfig.progress``).

    Marks the last record with ``early_stop: True``; a resumed run that had stopped does not train on.
    """

    def __init__(self, patience: int, monitor: str | None = None, mode: str | None = None, verbose: bool = True) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience, self.monitor, self.mode, self.verbose = patience, monitor, mode, verbose
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._restored = False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self._restored = state.get("best"), state.get("best_epoch"), True

    def on_fit_start(self, tuner: Run, train: Any, val: Any) -> None:
        self.monitor = self.monitor or tuner.config.best_metric
        if not self._restored:  # a fresh run, or a state written without callbacks: replay the history
            self.best, self.best_epoch = None, None
            for r in tuner.history:
                self._observe(r)

    def _observe(self, record: dict[str, Any]) -> None:
        value = record.get(self.monitor)
        if value is not None and math.isfinite(value) and improves(self.monitor, value, self.best, self.mode):
            self.best, self.best_epoch = float(value), int(record["epoch"])

    def on_epoch_end(self, tuner: Run, record: dict[str, Any]) -> None:
        if record.get(self.monitor) is None:
            return  # no validation this epoch: nothing to judge
        self._observe(record)
        epoch = record["epoch"]
        phase_start = max([b + 1 for b in tuner.policy.boundaries() if b < epoch], default=1)
        since = max(self.best_epoch or 0, phase_start - 1)
        if epoch - since >= self.patience:
            record["early_stop"] = True
            tuner.should_stop = True
            if self.verbose and tuner.is_main and tuner.config.progress:
                tqdm.write(f"early stop: no better {self.monitor} for {self.patience} epoch(s)")


class TimeBudget(Callback):
    """End training before it runs past ``seconds`` of wall time (``TrainConfig.time_budget``).

    After each epoch, if the time so far plus the mean epoch time so far would pass the budget,
    the epoch is the last: its record gets ``time_budget_stop: True`` and training ends as with
    early stopping. Time is counted over the whole run (the ``seconds`` of epochs from before a
    resume included), plus validation and file writing of this process's epochs.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._start = 0.0
        self._before = 0.0

    def on_fit_start(self, tuner: Run, train: Any, val: Any) -> None:
        import time

        self._start = time.perf_counter()
        self._before = sum(r.get("seconds", 0.0) for r in tuner.history)  # epochs trained before a resume
        self._done = len(tuner.history)

    def on_epoch_end(self, tuner: Run, record: dict[str, Any]) -> None:
        import time

        elapsed = self._before + time.perf_counter() - self._start
        epochs = max(len(tuner.history), 1)
        if elapsed + elapsed / epochs > self.seconds and record["epoch"] < tuner.config.epochs:
            record["time_budget_stop"] = True
            record["early_stop"] = True
            tuner.should_stop = True


class RunReport(Callback):
    """At the end of fit, write plots, ``report.md``/``report.json`` and ``MODEL_CARD.md`` (see `tlkit.report`)."""

    def __init__(self) -> None:
        self.facts: dict[str, Any] = {}
        self.val: Any = None

    def on_fit_start(self, tuner: Run, train: Any, val: Any) -> None:
        from tlkit._loaders import dataset_length

        self.val = val  # the photos the run's top losses come from (fit end)
        self.facts = {"train_images": dataset_length(train)}
        if val is not None:
            self.facts["val_images"] = dataset_length(val)
        if hasattr(train, "root"):  # the folder's name only: a card is shared, the machine's paths are not
            self.facts["root"] = Path(train.root).name
        recorded = tuner.output_dir / "config.yaml" if tuner.output_dir is not None else None
        if val is not None and recorded is not None and recorded.is_file():
            from tlkit.config import RunConfig

            try:  # the config tlkit train (or the example) wrote for this run, just before fit
                self.facts["split"] = RunConfig.from_file(recorded).data.describe_split(names_only=True)
            except ValueError:
                pass  # a config this run did not write: the card says the split is not recorded

    def on_fit_end(self, tuner: Run) -> None:
        if tuner.output_dir is not None and tuner.history and tuner.is_main:
            from tlkit._runfiles import run_file_writes
            from tlkit.report import write_run_report

            with run_file_writes(tuner.output_dir):
                write_run_report(tuner, tuner.output_dir, self.facts)
                self._top_losses(tuner)

    def _top_losses(self, tuner: Run) -> None:
        """``top_losses.png``: the validation photos the final model gets most wrong (single-label)."""
        from tlkit.data import ImageFolderDataset

        if tuner.multilabel or not isinstance(self.val, ImageFolderDataset) or len(self.val) == 0:
            return
        from tlkit.interpret import plot_top_losses, top_losses

        try:
            plot_top_losses(top_losses(tuner, self.val, k=9), tuner.output_dir / "top_losses.png")
        except ImportError:  # matplotlib missing: the report already said plots are skipped
            pass

