"""The training core's parts: one train step (NaN guard, loss scaling), one meaning of epoch, seeds, NaN validation."""

import json

import pytest
import torch
from conftest import photo_split, tiny_tuner
from safetensors import safe_open

from tlkit import FineTuner, RunConfig
from tlkit._runtime import Runtime
from tlkit._training.state import assert_finite
from tlkit._training.step import NonFiniteLossError, TrainStep
from tlkit.callbacks import Callback
from tlkit.checkpoint import load_training_state

CLASSES = ["cardboard", "glass", "metal"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photo_split(tmp_path_factory.mktemp("core"), CLASSES)


def _step(model, scaler=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rt = Runtime(torch.device("cpu"), torch.float16 if scaler else None, False)
    return TrainStep(model, opt, rt, torch.nn.CrossEntropyLoss(), scaler=scaler), opt


def test_a_nan_step_is_not_taken_and_batchnorm_statistics_are_restored():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(3))
    model(torch.randn(2, 3, 8, 8))
    step, _ = _step(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="nan"):
        step(model, x, torch.tensor([0, 1]), 0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all(), k


def test_the_step_scales_the_loss_under_float16_and_skips_overflowing_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    # 2**8, not 2**16: a float16 loss near 1 scaled by 2**16 is past float16's 65504 and overflows
    # in about one draw of three, which made this test flaky.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    step, _ = _step(model, scaler)
    w = model.weight.detach().clone()
    step(model, torch.randn(2, 4), torch.tensor([0, 1]), 0)
    assert not torch.equal(model.weight, w) and scaler.get_scale() == 2.0**8
    # a scale so large the scaled gradients overflow: the scaler skips the step and lowers its scale
    huge = torch.amp.GradScaler("cpu", init_scale=1e38)
    step, _ = _step(model, huge)
    w = model.weight.detach().clone()
    step(model, torch.randn(2, 4), torch.tensor([0, 1]), 1)
    assert torch.equal(model.weight, w) and huge.get_scale() < 1e38


def test_lr_find_goes_through_the_shared_step_with_a_loss_scaler_under_fp16(data):
    train, _ = data
    result = tiny_tuner(CLASSES, precision="fp16").lr_find(train, num_steps=4)
    assert result.loss_scale is not None and len(result.lrs) >= 2
    assert tiny_tuner(CLASSES).lr_find(train, num_steps=3).loss_scale is None  # fp32 needs none


def test_epoch_means_completed_epochs_in_every_file_and_attribute(data, tmp_path):
    train, val = data
    run = tmp_path / "run"
    tuner = tiny_tuner(CLASSES, output_dir=run, epochs=2)
    history = tuner.fit(train, val)
    saved = tuner.save(tmp_path / "saved.safetensors")
    epochs = {
        "attribute": tuner.epoch,
        "history": history[-1]["epoch"],
        "metrics.jsonl": json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["epoch"],
        "state": load_training_state(run / "last.state.pt")["epoch"],
        "last header": FineTuner.load(run / "last.safetensors").epoch,
        "save() header": FineTuner.load(saved).epoch,
    }
    assert set(epochs.values()) == {2}, epochs
    with safe_open(str(run / "best.safetensors"), "pt") as f:
        best = json.loads(f.metadata()["tlkit"])
    assert best["epoch"] == best["metrics"]["epoch"] == tuner.best["epoch"]


def _config(tmp_path, seed):
    return RunConfig.model_validate({
        "backbone": {"name": "test_resnet", "pretrained": False, "data_config": {"input_size": [3, 64, 64]}},
        "train": {"seed": seed, "device": "cpu", "progress": False}, "output_dir": str(tmp_path)})


def test_from_config_initialises_head_and_random_backbone_under_the_seed(tmp_path):
    torch.manual_seed(123)
    a = FineTuner.from_config(_config(tmp_path, 7), CLASSES).model.state_dict()
    torch.manual_seed(456)  # whatever the caller's RNG holds
    b = FineTuner.from_config(_config(tmp_path, 7), CLASSES).model.state_dict()
    c = FineTuner.from_config(_config(tmp_path, 8), CLASSES).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.fc.weight" if "fc.fc.weight" in a else "fc.weight"],
                           c["fc.fc.weight" if "fc.fc.weight" in c else "fc.weight"])


class Poison(Callback):
    """At the start of epoch 2, fill one BatchNorm buffer of every layer (training stays finite)."""

    def __init__(self, buffer, value):
        self.buffer, self.value = buffer, value

    def on_epoch_start(self, tuner, epoch):
        if epoch == 2:
            for m in tuner.model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    getattr(m, self.buffer).fill_(self.value)


@pytest.mark.parametrize("buffer, value, error", [
    ("running_mean", float("nan"), "validation loss is nan at epoch 2; the last good checkpoint is kept"),
    # inf variances normalise to 0: validation stays finite, but the file would predict NaN later
    ("running_var", float("inf"), "running_var' holds NaN or inf; nothing was written"),
])
def test_poisoned_batchnorm_never_reaches_a_checkpoint(data, tmp_path, buffer, value, error):
    train, val = data
    run = tmp_path / "run"
    tuner = tiny_tuner(CLASSES, output_dir=run, epochs=3, callbacks=[Poison(buffer, value)])
    with pytest.raises(FloatingPointError, match=error):
        tuner.fit(train, val)
    kept = FineTuner.load(run / "last.safetensors")
    assert kept.epoch == 1 and load_training_state(run / "last.state.pt")["epoch"] == 1
    probs = torch.tensor(list(kept.predict(train.samples[0][0])[0].probabilities.values()))
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-5


def test_no_file_with_non_finite_tensors_is_written():
    with pytest.raises(FloatingPointError, match="'w' holds NaN or inf; nothing was written"):
        assert_finite({"w": torch.tensor([1.0, float("inf")])}, "runs/x/last.safetensors")
    assert_finite({"n": torch.tensor([3]), "w": torch.zeros(2)}, "ok")


def test_balanced_sampler_draws_classes_equally_and_keeps_the_step_count():
    from collections import Counter

    from tlkit._loaders import BalancedSampler, steps_per_epoch, train_loader

    labels = [0] * 90 + [1] * 10
    draw = list(BalancedSampler(labels, seed=3, epoch=0))
    counts = Counter(labels[i] for i in draw)
    assert len(draw) == 100 and 35 <= counts[1] <= 65  # 50 expected; a shuffle gives exactly 10
    assert draw == list(BalancedSampler(labels, seed=3, epoch=0)) != list(BalancedSampler(labels, seed=3, epoch=1))
    # two ranks split one draw, like the shuffle sampler
    r0, r1 = list(BalancedSampler(labels, 3, 0, 0, 2)), list(BalancedSampler(labels, 3, 0, 1, 2))
    assert [x for pair in zip(r0, r1) for x in pair] == draw
    data = torch.utils.data.TensorDataset(torch.zeros(100, 2), torch.tensor(labels))
    loader = train_loader(data, 16, seed=0, epoch=0, dist=None, num_workers=0, device=torch.device("cpu"),
                          sampler="balanced")
    assert len(loader) == steps_per_epoch(data, 16, None) == 6


def test_sampler_balanced_in_a_fit(tmp_path):
    train, val = photo_split(tmp_path, ("cardboard", "glass"))
    tuner = tiny_tuner(train.classes, epochs=1, sampler="balanced")
    history = tuner.fit(train, val)
    assert history[-1]["epoch"] == 1 and tuner.step == 2  # 8 images, batch 4: as with shuffle
