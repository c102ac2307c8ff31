"""Logger callbacks: CSV, TensorBoard and MLflow (see `tlkit.callbacks`).

Each logger writes on the main process only (rank 0 under torchrun) and ends a crash and a
resume with exactly one entry per completed epoch, even when the kill came after an epoch was
logged but before its resume state was written (resume then trains that epoch again):

* `CSVLogger` rewrites ``metrics.csv`` from ``FineTuner.history`` at every epoch.
* `TensorBoardLogger` reopens its folder with ``purge_step``: TensorBoard hides what the killed
  run wrote after the last saved step.
* `MLflowLogger` continues the same MLflow run (its id is in the resume state) and logs only
  epochs that run does not hold yet.

``TrainConfig.loggers`` builds them by name with their defaults (`logger_callbacks`); pass
instances in ``FineTuner(callbacks=[...])`` for other settings. TensorBoard and MLflow are
optional packages: ``pip install 'tlkit[tensorboard]'``, ``'tlkit[mlflow]'`` or ``'tlkit[loggers]'``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlkit._runfiles import run_file_writes
from tlkit._version import __version__
from tlkit.callbacks import Callback
from tlkit.checkpoint import atomic_write_bytes

if TYPE_CHECKING:
    from tlkit._protocols import Run

__all__ = ["CSVLogger", "MLflowLogger", "TensorBoardLogger", "logger_callbacks", "record_scalars", "run_params"]

# Record keys that are not one number per epoch; per_class_recall becomes ``recall/<class>``.
_NOT_SCALAR = {"per_class_recall", "confusion_matrix"}


def _require(module: str, extra: str, what: str) -> None:
    """Fail when the logger is built, not after the first epoch, if its package is missing."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what} needs the '{module}' package: pip install 'tlkit[{extra}]'")


def _run_folder(tuner: Run, given: str | Path | None, default: str, what: str) -> Path:
    """``given``, else ``OUTPUT_DIR/default``.

    Raises:
        ValueError: neither ``given`` nor ``tuner.output_dir`` is set.
    """
    if given is not None:
        return Path(given)
    if tuner.output_dir is None:
        raise ValueError(f"{what} writes to OUTPUT_DIR/{default} but the FineTuner has no output_dir; "
                         "set output_dir or give the logger a path")
    return tuner.output_dir / default


def record_scalars(record: dict[str, Any], classes: Sequence[str] = ()) -> dict[str, Any]:
    """The one-value-per-epoch entries of an epoch record, ``per_class_recall`` spread out.

    Args:
        record: an entry of ``FineTuner.history``.
        classes: class names, for the order of the ``recall/<class>`` entries (classes the
            record holds but ``classes`` lacks follow, in the record's order).

    Returns:
        ``epoch``, the record's scalar keys in its order (``confusion_matrix`` and other lists
        or dicts left out), then ``recall/<class>`` for each class with a recall.
    """
    out = {k: v for k, v in record.items() if k not in _NOT_SCALAR and not isinstance(v, (dict, list))}
    recall = record.get("per_class_recall") or {}
    for c in [*[c for c in classes if c in recall], *[c for c in recall if c not in classes]]:
        out[f"recall/{c}"] = recall[c]
    return out


class CSVLogger(Callback):
    """``metrics.csv``: one row per completed epoch, rewritten whole and atomically at each epoch end.

    The columns are ``epoch``, every scalar key of the records (losses, ``top1``, ``macro_f1``,
    ``lr``, ``trainable_params``, ``seconds``, ``images_per_s``, ``cached_features``, keys
    callbacks add) in first-seen order, then ``recall/<class>`` in class order. Empty cells are
    values an epoch lacks (no validation data). Floats are written with ``repr``, so
    ``float(cell)`` gives the recorded value exactly.

    Because the file is rebuilt from ``FineTuner.history``, which resume restores, a crash and
    a resume leave exactly one row per epoch.

    Args:
        path: the CSV file; default ``OUTPUT_DIR/metrics.csv``.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._file: Path | None = None

    def on_fit_start(self, tuner: Run, train: Any, val: Any) -> None:
        self._file = _run_folder(tuner, self.path, "metrics.csv", "CSVLogger")
        if tuner.is_main:  # a write killed halfway leaves its temporary file behind
            for tmp in self._file.parent.glob(f".{self._file.name}.tmp-*"):
                tmp.unlink(missing_ok=True)

    def on_epoch_end(self, tuner: Run, record: dict[str, Any]) -> None:
        if not tuner.is_main or self._file is None:
            return
        rows = [record_scalars(r, tuner.classes) for r in tuner.history]
        columns = list(dict.fromkeys(k for row in rows for k in row))
        recall = [c for c in columns if c.startswith("recall/")]
        columns = [c for c in columns if not c.startswith("recall/")] + recall
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)  # missing keys become empty cells (DictWriter's restval)
        with run_file_writes(tuner.output_dir or self._file.parent):
            atomic_write_bytes(self._file, text.getvalue().encode())


class TensorBoardLogger(Callback):
    """TensorBoard event files: the training loss every few steps, validation metrics per epoch.

    Scalars, all at ``global_step = tuner.step`` (optimizer steps so far):

    * ``train/loss`` every ``log_every_n_steps`` steps: the mean loss over those steps' images;
    * per epoch: ``train/epoch_loss``, ``val/loss``, ``val/top1``, ``val/macro_f1``,
      ``val/recall/<class>`` (with validation data) and ``lr``; every other number of the
      epoch's record under its own name (``seconds``, ``images_per_s``, ``trainable_params``,
      and what callbacks before the logger added, e.g. a user's ``on_epoch_end``).

    When the folder already holds event files (a resumed or restarted run) the writer is opened
    with ``purge_step = tuner.step + 1``: TensorBoard then hides every older event at a later
    step, what a killed run logged after its last saved epoch, and keeps the saved epoch's own
    scalars (they sit at ``tuner.step``). Events are flushed at each epoch end, before the
    resume state is written, and the writer is closed at the end of fit. Give each run its own
    folder (TensorBoard reads one folder as one run); epochs trained before the logger was added
    to a run are not written, as their step counts are not recorded.

    Args:
        log_dir: the event folder; default ``OUTPUT_DIR/tensorboard``.
        log_every_n_steps: steps between ``train/loss`` points (``>= 1``).

    Raises:
        ImportError: the ``tensorboard`` package is missing (``pip install 'tlkit[tensorboard]'``).
        ValueError: ``log_every_n_steps < 1``.
    """

    def __init__(self, log_dir: str | Path | None = None, log_every_n_steps: int = 10) -> None:
        _require("tensorboard", "tensorboard", "TensorBoardLogger")
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be at least 1, got {log_every_n_steps}")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.log_every_n_steps = log_every_n_steps
        self.writer: Any = None  # torch.utils.tensorboard.SummaryWriter on the main process
        self._sum, self._seen = 0.0, 0

    def on_fit_start(self, tuner: Run, train: Any, val: Any) -> None:
        folder = _run_folder(tuner, self.log_dir, "tensorboard", "TensorBoardLogger")
        self._close()  # a callback object reused for a second fit
        self._sum, self._seen = 0.0, 0
        if not tuner.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        restart = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(str(folder), purge_step=tuner.step + 1 if restart else None)

    def on_train_batch_end(self, tuner: Run, loss: float, batch_size: int) -> None:
        if self.writer is None:
            return
        self._sum, self._seen = self._sum + loss * batch_size, self._seen + batch_size
        if tuner.step % self.log_every_n_steps == 0 and self._seen:
            self.writer.add_scalar("train/loss", self._sum / self._seen, global_step=tuner.step)
            self._sum, self._seen = 0.0, 0

    def on_epoch_end(self, tuner: Run, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        tags = {"train/epoch_loss": "train_loss", "val/loss": "val_loss", "val/top1": "top1",
                "val/macro_f1": "macro_f1", "lr": "lr"}
        scalars = {tag: record.get(key) for tag, key in tags.items()}
        scalars.update({f"val/{k}": v for k, v in record_scalars(record, tuner.classes).items()
                        if k.startswith("recall/")})
        # Every other number of the record (timings, what user callbacks add) under its own name.
        scalars.update({k: v for k, v in record_scalars(record).items()
                        if k not in set(tags.values()) | {"epoch"} and not k.startswith("recall/")
                        and isinstance(v, (int, float)) and not isinstance(v, bool)})
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, global_step=tuner.step)
        # Flushed before the resume state is written: a kill after it never loses this epoch.
        self.writer.flush()

    def on_checkpoint_saved(self, tuner: Run, paths: dict[str, Path]) -> None:
        if self.writer is not None:
            self.writer.flush()

    def on_fit_end(self, tuner: Run) -> None:
        self._close()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested dicts as ``prefix.key`` entries; lists as JSON; everything as a string."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}", v))
        return out
    text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return {prefix: text[:6000]}  # MLflow's limit on a parameter value (characters)


def _metric_key(key: str) -> str:
    """MLflow accepts letters, digits, ``_ - . : /`` and spaces in metric names; others become ``_``."""
    head, sep, tail = key.partition("/")
    clean = re.sub(r"[^\w.\- :]", "_", tail if sep else head)
    return f"{head}/{clean}" if sep else clean


def run_params(tuner: Run) -> dict[str, str]:
    """The parameters `MLflowLogger` records: backbone, head, freeze policy and TrainConfig, flattened.

    Returns:
        ``backbone`` (the timm name), ``num_classes``, then ``head.*``, ``freeze.*`` and
        ``train.*`` (the fields of each config; nested values as ``a.b``, lists as JSON).
    """
    params = {"backbone": tuner.backbone.name, "num_classes": str(len(tuner.classes))}
    params.update(_flatten("head", tuner.head.model_dump(mode="json")))
    params.update(_flatten("freeze", tuner.policy.model_dump(mode="json")))
    params.update(_flatten("train", tuner.config.model_dump(mode="json")))
    return params


class MLflowLogger(Callback):
    """An MLflow run per fit: parameters once, each epoch's metrics at ``step = epoch``.

    Uses `mlflow.MlflowClient` only, never MLflow's global active run, so nothing leaks into
    other code of the process. The tracking store is ``tracking_uri``, else the
    ``MLFLOW_TRACKING_URI`` environment variable, else a local SQLite store,
    ``sqlite:///OUTPUT_DIR/mlflow.db`` (MLflow 3 refuses the old ``./mlruns`` file store);
    no server is needed. See it with ``mlflow ui --backend-store-uri sqlite:///OUTPUT_DIR/mlflow.db``.

    Metrics are the scalars of the epoch record (`record_scalars`: losses, ``top1``,
    ``macro_f1``, ``lr``, ``seconds``..., ``recall/<class>``). The run id and the last epoch
    logged are kept in the resume state (`state_dict`): a resumed fit continues the same run,
    and epochs the run already holds are not logged again (MLflow would add a second point at
    the same step). An epoch logged before a kill that came ahead of its resume state keeps the
    values logged then (resume trains it again to the same weights; timings differ). The run is
    marked ``FINISHED`` at the end of fit; a killed run stays ``RUNNING`` until resumed.

    Args:
        tracking_uri: an MLflow tracking URI (``sqlite:///...``, ``http://server:5000``...).
        experiment: the experiment's name, created if missing.
        run_name: the run's name; default the name of ``output_dir`` (MLflow picks one without it).

    Raises:
        ImportError: the ``mlflow`` package is missing (``pip install 'tlkit[mlflow]'``).
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "tlkit", run_name: str | None = None) -> None:
        _require("mlflow", "mlflow", "MLflowLogger")
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.run_id: str | None = None
        self.last_epoch = 0  # the highest epoch the run holds
        self.client: Any = None  # mlflow.MlflowClient on the main process
        self._restored = False  # the run id came from a resume state, not from an earlier fit

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "last_epoch": self.last_epoch} if self.run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id, self.last_epoch = state.get("run_id"), int(state.get("last_epoch", 0))
        self._restored = True

    def _uri(self, tuner: Run) -> tuple[str, Path | None]:
        """The tracking URI, and the artifact folder when it is the default local store."""
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri, None
        db = _run_folder(tuner, None, "mlflow.db", "MLflowLogger").resolve()
        return f"sqlite:///{db}", db.with_name("mlartifacts")

    def on_fit_start(self, tuner: Run, train: Any, val: Any) -> None:
        uri, artifacts = self._uri(tuner)
        if not tuner.is_main:
            return
        from mlflow import MlflowClient

        if artifacts is not None:
            artifacts.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        if not self._restored:  # a fresh fit, even with this object reused: a new run
            self.run_id, self.last_epoch = None, 0
        self._restored = False
        if not self._continue_run():
            self._start_run(tuner, artifacts)
        # The run may hold epochs the resume state does not know of (logged, then killed
        # before the state was written); log only what it lacks, from the restored history.
        self.last_epoch = max(self.last_epoch, self._epochs_in_run())
        for record in tuner.history:
            self.on_epoch_end(tuner, record)

    def _continue_run(self) -> bool:
        """Mark the run of the resume state running again; ``False`` when there is none to continue."""
        if self.run_id is None:
            return False
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(self.run_id)
        except MlflowException:
            warnings.warn(f"MLflowLogger: run {self.run_id} of the resume state is not in the tracking store "
                          f"{self.client.tracking_uri}; starting a new run", stacklevel=2)
            self.run_id, self.last_epoch = None, 0
            return False
        self.client.update_run(self.run_id, status="RUNNING")
        return True

    def _start_run(self, tuner: Run, artifacts: Path | None) -> None:
        from mlflow.entities import Param

        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(
            self.experiment, artifact_location=artifacts.as_uri() if artifacts is not None else None)
        name = self.run_name or (tuner.output_dir.name if tuner.output_dir is not None else None)
        tags = {"tlkit.version": __version__}
        if tuner.output_dir is not None:
            tags["tlkit.output_dir"] = str(tuner.output_dir.resolve())
        self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        self.last_epoch = 0
        params = [Param(k, v) for k, v in run_params(tuner).items()]
        for chunk in _chunks(params, 100):  # MLflow's limit on parameters per log_batch
            self.client.log_batch(self.run_id, params=chunk)

    def _epochs_in_run(self) -> int:
        """The highest step of ``train_loss`` (every epoch record has one) in the run; 0 if none."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, "train_loss")), default=0)

    def on_epoch_end(self, tuner: Run, record: dict[str, Any]) -> None:
        epoch = int(record["epoch"])
        if self.client is None or epoch <= self.last_epoch:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # MLflow timestamps are milliseconds
        scalars = record_scalars(record, tuner.classes)
        metrics = [Metric(_metric_key(k), float(v), now, epoch) for k, v in scalars.items()
                   if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)]
        for chunk in _chunks(metrics, 1000):  # MLflow's limit on metrics per log_batch
            self.client.log_batch(self.run_id, metrics=chunk)
        self.last_epoch = epoch

    def on_fit_end(self, tuner: Run) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status="FINISHED")


_LOGGERS: dict[str, type[Callback]] = {"csv": CSVLogger, "tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}


def logger_callbacks(names: Sequence[str]) -> list[Callback]:
    """The logger callbacks ``TrainConfig.loggers`` names, in that order, with their defaults.

    Args:
        names: any of ``"csv"`` (`CSVLogger`), ``"tensorboard"`` (`TensorBoardLogger`),
            ``"mlflow"`` (`MLflowLogger`).

    Returns:
        One new logger per name.

    Raises:
        ValueError: an unknown name.
        ImportError: the package of a logger is missing (the message names the pip extra).
    """
    unknown = [n for n in names if n not in _LOGGERS]
    if unknown:
        raise ValueError(f"unknown logger {unknown[0]!r}: choose from 'csv', 'tensorboard' "
                         "(pip install 'tlkit[tensorboard]'), 'mlflow' (pip install 'tlkit[mlflow]')")
    return [_LOGGERS[n]() for n in names]
