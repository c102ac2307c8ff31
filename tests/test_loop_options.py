"""A loop users can bend (issue 26): gradient accumulation, timm optimizers, a loss callable."""

import pytest
import timm
import torch
from torch.utils.data import TensorDataset

from tlkit import FineTuner, FreezePolicy, HeadReplacer, TrainConfig

CLASSES = ["a", "b", "c"]


def _tuner(**train):
    torch.manual_seed(0)
    model = HeadReplacer(3).apply(timm.create_model("test_vit"))  # LayerNorm only: no batch statistics
    config = TrainConfig(**{"epochs": 2, "lr": 1e-2, "warmup_epochs": 0, "device": "cpu", "precision": "fp32",
                            "progress": False, "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, **train})
    data = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
            "crop_pct": 1.0, "crop_mode": "center"}
    return FineTuner(model, CLASSES, config=config, data_config=data, policy=FreezePolicy(depth=0))


def _data():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 3, (16,), generator=g))


def test_accumulating_k_batches_of_b_matches_one_step_of_k_times_b():
    """2 micro-batches of 4 with summed gradients = 1 batch of 8: same images per step (the same
    shuffle), same mean loss; float32 sums in another order differ by rounding only (atol 1e-6)."""
    small = _tuner(batch_size=4, accumulate_steps=2)
    small.fit(_data())
    large = _tuner(batch_size=8)
    large.fit(_data())
    assert small.step == large.step == 4  # optimizer steps: 16 images / 8 per step, 2 epochs
    a, b = small.model.state_dict(), large.model.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert small.history[-1]["train_loss"] == pytest.approx(large.history[-1]["train_loss"], abs=1e-6)
    unaccumulated = _tuner(batch_size=4)
    unaccumulated.fit(_data())
    c = unaccumulated.model.state_dict()
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4  # and it is not plain batch 4


@pytest.mark.parametrize("name", ["lamb", "lion", "nadamw"])
def test_a_timm_optimizer_name_trains_over_tlkits_groups(name):
    tuner = _tuner(batch_size=8, optimizer=name, lr=1e-3)
    before = {k: v.clone() for k, v in tuner.model.state_dict().items()}
    tuner.fit(_data())
    assert type(tuner.optimizer).__name__.lower().startswith(name[:4].lower()) or name in repr(tuner.optimizer).lower()
    assert any(not torch.equal(v, before[k]) for k, v in tuner.model.state_dict().items())
    assert all("lr_scale" in g for g in tuner.optimizer.param_groups)


def test_an_unknown_optimizer_is_a_config_error_with_close_names():
    with pytest.raises(ValueError, match="did you mean lamb"):
        TrainConfig(optimizer="lamp")


def test_a_loss_callable_is_what_trains():
    calls = []

    def focal(logits, target, gamma=2.0):
        calls.append(logits.shape)
        logp = logits.log_softmax(1).gather(1, target[:, None]).squeeze(1)
        return (-(1 - logp.exp()) ** gamma * logp).mean()

    tuner = _tuner(batch_size=8)
    tuner.loss = focal
    tuner.fit(_data())
    assert calls == [(8, 3)] * 4
    assert tuner.lr_find(_data(), num_steps=3, start_lr=1e-4, end_lr=1e-2).lrs and len(calls) == 7


@pytest.mark.parametrize("kind,mid,end", [("cosine", 0.505, 0.01), ("linear", 0.505, 0.01), ("poly", 0.2575, 0.01),
                                          ("step", 0.1, 0.01), ("constant", 1.0, 1.0)])
def test_schedules_start_at_one_after_warmup_and_end_where_documented(kind, mid, end):
    from tlkit.schedule import lr_factor

    total, warm = 110, 10
    assert lr_factor(kind, 0, total, warm, 0.01) == pytest.approx(1 / 11)  # warm-up is shared
    assert lr_factor(kind, warm, total, warm, 0.01) == pytest.approx(1.0)
    assert lr_factor(kind, warm + 50, total, warm, 0.01) == pytest.approx(mid, abs=1e-3)
    assert lr_factor(kind, total, total, warm, 0.01) == pytest.approx(end, abs=1e-9)


def test_tanh_falls_monotonically_from_one_to_min_ratio():
    from tlkit.schedule import lr_factor

    values = [lr_factor("tanh", s, 100, 0, 0.0) for s in range(101)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_the_loop_follows_the_chosen_schedule():
    tuner = _tuner(batch_size=8, schedule="step", epochs=4, lr=1.0)
    tuner.fit(_data())
    assert [round(r["lr"], 6) for r in tuner.history] == [1.0, 1.0, 0.1, 0.01]


def test_a_time_budget_ends_the_run_within_it(monkeypatch):
    import time as time_module

    clock = iter(range(0, 10_000, 10))  # every reading of the clock is 10 s later: epochs "take" 10 s
    monkeypatch.setattr(time_module, "perf_counter", lambda: float(next(clock)))
    tuner = _tuner(batch_size=8, epochs=20, time_budget=35.0)
    history = tuner.fit(_data())
    assert history[-1].get("time_budget_stop") and history[-1]["early_stop"] and len(history) < 20


def test_the_auto_recipe_fits_its_schedule_to_the_data():
    from tlkit import RunConfig, apply_recipe
    from tlkit.recipes import adapt_to_data

    class Data:
        def __init__(self, n, classes):
            self.n, self.classes = n, classes

        def __len__(self):
            return self.n

    auto = apply_recipe(RunConfig(), "auto")
    assert auto.train.auto and auto.freeze.phases[0].epoch == 5
    few = adapt_to_data(auto, Data(60, ["a", "b", "c", "d"]))  # 15 per class: a probe only
    assert not few.freeze.phases and few.train.epochs == 30 and few.train.feature_cache
    assert adapt_to_data(auto, Data(1600, ["a"] * 6)).train.epochs == 15
    assert adapt_to_data(auto, Data(200, ["a"] * 6)).train.epochs == 30
    assert adapt_to_data(auto, Data(100_000, ["a"] * 6)).train.epochs == 8
    plain = apply_recipe(RunConfig(), "lp-ft")
    assert adapt_to_data(plain, Data(60, ["a"] * 4)) == plain
