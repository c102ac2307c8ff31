"""Each logger's files, read back with its own library's reader, hold one entry per epoch, also across crashes."""

import csv
import shutil
import sys

import pytest
from conftest import copy_sample, tiny_tuner

from tlkit import ImageFolderDataset
from tlkit.callbacks import Callback
from tlkit.loggers import CSVLogger, MLflowLogger, TensorBoardLogger, logger_callbacks, record_scalars

CLASSES = ["cardboard", "glass", "metal"]
STEPS_PER_EPOCH = 3  # 12 training images, batch 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loggers")
    return (ImageFolderDataset(copy_sample(root / "train", CLASSES, 4)),
            ImageFolderDataset(copy_sample(root / "val", CLASSES, 2, offset=10)))


@pytest.fixture(autouse=True)
def _local_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store, not a server


@pytest.fixture(scope="module")
def empty_mlflow_db(tmp_path_factory):
    """An MLflow database with its tables created, copied into each run folder as the logger's store.

    Creating one runs MLflow's own schema migrations, about 7 s on a small CPU: done once here.
    """
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def _run_dir(tmp_path, template=None):
    """A new run folder; with ``template``, a copy of the empty MLflow store beside it (an
    ``mlflow.db`` inside would make the folder hold a run: `tlkit.runlock.RUN_FILES`)."""
    run = tmp_path / "run"
    run.mkdir()
    if template is not None:
        shutil.copy(template, tmp_path / "mlflow.db")
    return run


def _store(run):
    """The tracking URI of the store `_run_dir` put beside ``run``."""
    return f"sqlite:///{run.parent / 'mlflow.db'}"


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cell(value):
    """What csv.DictWriter writes for a record value."""
    return "" if value is None else str(value)


def _tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def _mlflow_client(run, uri=None):
    from mlflow import MlflowClient

    return MlflowClient(uri or f"sqlite:///{run / 'mlflow.db'}")


def _only_run(client):
    runs = client.search_runs([client.get_experiment_by_name("tlkit").experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory, empty_mlflow_db):
    """One 2-epoch fit with the three loggers: (run folder, history, tuner, the MLflow logger)."""
    pytest.importorskip("tensorboard")
    train, val = data
    run = _run_dir(tmp_path_factory.mktemp("fitted"), empty_mlflow_db)
    mlflow_logger = MLflowLogger(tracking_uri=_store(run))
    tuner = tiny_tuner(CLASSES, output_dir=run, callbacks=[CSVLogger(), TensorBoardLogger(log_every_n_steps=2),
                                                           mlflow_logger])
    history = tuner.fit(train, val)
    return run, history, tuner, mlflow_logger


def test_csv_rows_are_the_history(fitted):
    run, history, _, _ = fitted
    rows = _csv_rows(run / "metrics.csv")
    assert len(rows) == len(history) == 2
    header = list(rows[0])
    assert header[0] == "epoch" and header[-3:] == [f"recall/{c}" for c in CLASSES]
    assert "confusion_matrix" not in header and "per_class_recall" not in header
    for row, record in zip(rows, history):
        expected = record_scalars(record, CLASSES)
        assert {k: _cell(v) for k, v in expected.items()} == row
        assert float(row["top1"]) == record["top1"]  # repr round-trips
        assert float(row["recall/glass"]) == record["per_class_recall"]["glass"]


def test_csv_without_output_dir_needs_a_path(data, tmp_path):
    train, val = data
    path = tmp_path / "elsewhere" / "m.csv"
    tiny_tuner(CLASSES, epochs=1, callbacks=[CSVLogger(path)]).fit(train, val)
    assert [r["epoch"] for r in _csv_rows(path)] == ["1"]
    with pytest.raises(ValueError, match="no output_dir"):
        tiny_tuner(CLASSES, epochs=1, callbacks=[CSVLogger()]).fit(train, val)


def test_tensorboard_scalars_are_the_history_at_the_step_counts(fitted):
    run, history, tuner, _ = fitted
    events = _tensorboard(run / "tensorboard")
    top1 = events.Scalars("val/top1")
    assert [e.step for e in top1] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH] and tuner.step == 2 * STEPS_PER_EPOCH
    assert [e.value for e in top1] == pytest.approx([r["top1"] for r in history], rel=1e-6)  # stored as float32
    assert [e.value for e in events.Scalars("train/epoch_loss")] == pytest.approx([r["train_loss"] for r in history])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert {"val/loss", "val/macro_f1", "lr", "val/recall/metal"} <= set(events.Tags()["scalars"])


def test_mlflow_run_holds_params_and_one_point_per_epoch(fitted):
    run, history, _, logger = fitted
    client = _mlflow_client(run, _store(run))
    found = _only_run(client)
    assert found.info.run_id == logger.run_id and found.info.status == "FINISHED" and found.info.run_name == "run"
    top1 = client.get_metric_history(logger.run_id, "top1")
    assert [(m.step, m.value) for m in top1] == [(r["epoch"], r["top1"]) for r in history]
    recall = client.get_metric_history(logger.run_id, "recall/glass")
    assert [m.value for m in recall] == [r["per_class_recall"]["glass"] for r in history]
    params = found.data.params
    assert params["backbone"] == "test_resnet" and params["train.epochs"] == "2" and params["train.lr"] == "0.01"
    assert params["head.num_classes"] == "3" and "freeze.depth" in params


class CrashAt(Callback):
    """Raises at ``hook`` of epoch ``epoch``, as a kill would stop the run there."""

    def __init__(self, hook, epoch):
        self.hook, self.epoch = hook, epoch

    def on_epoch_end(self, tuner, record):
        if self.hook == "on_epoch_end" and record["epoch"] == self.epoch:
            raise KeyboardInterrupt  # the epoch is logged, its resume state is not written

    def on_checkpoint_saved(self, tuner, paths):
        if self.hook == "on_checkpoint_saved" and tuner.epoch == self.epoch:
            raise KeyboardInterrupt  # the epoch's files are all written


def _loggers(uri=None):
    return [CSVLogger(), TensorBoardLogger(log_every_n_steps=2), MLflowLogger(tracking_uri=uri)]


def test_crash_and_resume_leave_one_entry_per_epoch_in_every_logger(data, tmp_path, empty_mlflow_db):
    pytest.importorskip("tensorboard")
    train, val = data
    run = _run_dir(tmp_path, empty_mlflow_db)
    first = _loggers(_store(run))
    with pytest.raises(KeyboardInterrupt):
        tiny_tuner(CLASSES, output_dir=run, epochs=3, callbacks=[*first, CrashAt("on_checkpoint_saved", 1)]).fit(
            train, val)
    second = _loggers(_store(run))
    with pytest.raises(KeyboardInterrupt):  # epoch 2 is logged everywhere, then resumed from epoch 1
        tiny_tuner(CLASSES, output_dir=run, epochs=3, callbacks=[*second, CrashAt("on_epoch_end", 2)]).fit(
            train, val, resume=True)
    last = _loggers(_store(run))
    tuner = tiny_tuner(CLASSES, output_dir=run, epochs=3, callbacks=last)
    history = tuner.fit(train, val, resume=True)
    for crashed in (first, second):
        crashed[1].writer.close()  # what a killed process would not do; nothing was left to write

    assert [r["epoch"] for r in history] == [1, 2, 3] and tuner.step == 3 * STEPS_PER_EPOCH
    assert [float(r["top1"]) for r in _csv_rows(run / "metrics.csv")] == [r["top1"] for r in history]

    events = _tensorboard(run / "tensorboard")
    top1 = events.Scalars("val/top1")
    assert [e.step for e in top1] == [3, 6, 9]
    assert [e.value for e in top1] == pytest.approx([r["top1"] for r in history], rel=1e-6)
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]

    assert first[2].run_id == second[2].run_id == last[2].run_id
    client = _mlflow_client(run, _store(run))
    assert _only_run(client).info.status == "FINISHED"
    logged = client.get_metric_history(last[2].run_id, "top1")
    assert [m.step for m in logged] == [1, 2, 3]
    assert [m.value for m in logged] == [r["top1"] for r in history]  # resume retrains epoch 2 exactly


def test_train_config_loggers_write_every_file(data, tmp_path):
    # The default store, OUTPUT_DIR/mlflow.db, created by the run (MLflow's migrations: seconds).
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    train, val = data
    run = _run_dir(tmp_path)
    history = tiny_tuner(CLASSES, output_dir=run, epochs=1, loggers=["csv", "tensorboard", "mlflow"]).fit(train, val)
    assert len(_csv_rows(run / "metrics.csv")) == 1
    assert len(_tensorboard(run / "tensorboard").Scalars("val/top1")) == 1
    client = _mlflow_client(run)
    assert [m.value for m in client.get_metric_history(_only_run(client).info.run_id, "top1")] == [history[0]["top1"]]


def test_only_the_main_process_writes(data, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    train, val = data
    tuner = tiny_tuner(CLASSES, output_dir=tmp_path / "run", epochs=1, callbacks=_loggers())
    tuner.is_main = False  # what another rank under torchrun sees
    tuner.fit(train, val)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_logger_callbacks_are_built_in_order_or_name_the_extra(monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    built = logger_callbacks(["csv", "tensorboard", "mlflow"])
    assert [type(cb) for cb in built] == [CSVLogger, TensorBoardLogger, MLflowLogger]
    with pytest.raises(ValueError, match="unknown logger 'wandb'"):
        logger_callbacks(["wandb"])
    for module, extra in (("mlflow", "mlflow"), ("tensorboard", "tensorboard")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # as if not installed
            with pytest.raises(ImportError, match=rf"pip install 'tlkit\[{extra}\]'"):
                logger_callbacks([module])
    with pytest.raises(ValueError, match="at least 1"):
        TensorBoardLogger(log_every_n_steps=0)


class _Gap(Callback):
    """A user callback that adds a metric of its own to every epoch's record."""

    def on_epoch_end(self, tuner, record):
        record["gap"] = float(record["train_loss"] - record["val_loss"])


def test_what_a_user_callback_adds_is_in_the_same_epochs_csv_row_and_tensorboard_step(data, tmp_path):
    """Issue 23: the loggers of TrainConfig.loggers ran before the user's callbacks, so the last
    CSV row and every TensorBoard step lacked their keys."""
    pytest.importorskip("tensorboard")
    train, val = data
    run = _run_dir(tmp_path)
    history = tiny_tuner(CLASSES, output_dir=run, loggers=["csv", "tensorboard"], callbacks=[_Gap()]).fit(train, val)
    rows = _csv_rows(run / "metrics.csv")
    assert [float(r["gap"]) for r in rows] == [r["gap"] for r in history]  # the last row too
    gaps = _tensorboard(run / "tensorboard").Scalars("val/gap") if "val/gap" in \
        _tensorboard(run / "tensorboard").Tags()["scalars"] else _tensorboard(run / "tensorboard").Scalars("gap")
    assert [e.value for e in gaps] == pytest.approx([r["gap"] for r in history], rel=1e-6)
