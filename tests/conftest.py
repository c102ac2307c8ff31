import os
import shutil
from pathlib import Path

import pytest
import timm
import torch

from tlkit import FineTuner, HeadReplacer, TrainConfig
from tlkit.callbacks import Callback

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (-n 2 on two cores) each worker computes with one thread: two workers of
    # two threads each would fight over the cores.
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "garbage" / "data"
MOBILENET_FILE = REPO / "examples" / "garbage" / "weights" / "mobilenetv2_100_tf_qat_dequant.safetensors"
SMALL = {"input_size": [3, 64, 64], "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
         "std": [0.5, 0.5, 0.5], "crop_pct": 0.875, "crop_mode": "center"}


def copy_sample(dst: Path, classes=("cardboard", "glass", "metal"), per_class=4, offset=0) -> Path:
    """Copy a few real shipped photos per class into dst/<class>/ (tests never write to the repo)."""
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((SAMPLE / c).iterdir())[offset:offset + per_class]:
            shutil.copy(f, dst / c / f.name)
    return dst


def photo_split(root: Path, classes) -> tuple:
    """(train, val) ImageFolderDatasets: 4 real photos per class to train on, 2 others to validate."""
    from tlkit import ImageFolderDataset

    return (ImageFolderDataset(copy_sample(root / "train", classes, 4)),
            ImageFolderDataset(copy_sample(root / "val", classes, 2, offset=10)))


@pytest.fixture(scope="session", autouse=True)
def _own_origin_key(tmp_path_factory):
    """The run-origin key (tlkit._origin) of this test session, not the account's ~/.config one."""
    import os

    os.environ["TLKIT_HOME"] = str(tmp_path_factory.mktemp("tlkit-home"))


@pytest.fixture
def image_root(tmp_path) -> Path:
    return copy_sample(tmp_path / "images")


def tiny_tuner(classes, output_dir=None, policy=None, model_name="test_resnet", callbacks=None, **train) -> FineTuner:
    torch.manual_seed(0)
    model = timm.create_model(model_name)
    HeadReplacer(len(classes)).apply(model)
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 4, "eval_batch_size": 8, "lr": 1e-2, "warmup_epochs": 0,
                         "precision": "fp32", "device": "cpu", "progress": False, **train})
    return FineTuner(model, classes, policy=policy, config=cfg, data_config=dict(SMALL), output_dir=output_dir,
                     callbacks=callbacks)


class Crash(Exception):
    """A simulated crash (see `CrashAfter`)."""


class CrashAfter(Callback):
    """Raises ``error`` (default `Crash`) once the files of epoch ``epoch`` (1-based) are written."""

    def __init__(self, epoch, error: type[BaseException] = Crash):
        self.epoch, self.error = epoch, error

    def on_checkpoint_saved(self, tuner, paths):
        if tuner.epoch == self.epoch:
            raise self.error


def recorded_run(run: Path, root: Path, classes, val_fraction: float) -> Path:
    """A run folder as `tlkit train` leaves it: a tiny model's ``best.safetensors`` beside the
    ``config.yaml`` that names ``root`` and its split. Returns the checkpoint's path."""
    from tlkit import DatasetConfig, RunConfig
    from tlkit._origin import sign_run_config

    run.mkdir(parents=True)
    checkpoint = tiny_tuner(classes).save(run / "best.safetensors")
    config = RunConfig(data=DatasetConfig(root=root, val_fraction=val_fraction), output_dir=run)
    (run / "config.yaml").write_text(config.to_yaml())
    sign_run_config(run)  # as tlkit train does: this account's run
    return checkpoint
