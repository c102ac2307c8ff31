"""Recipe building blocks: auto-augment, mixup, class weights, EMA, early stopping, TTA, LR finder."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import SMALL, copy_sample, tiny_tuner
from pydantic import ValidationError
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from tlkit import AugmentConfig, FineTuner, FreezePolicy, ImageFolderDataset, RunConfig, TrainConfig, apply_recipe
from tlkit.callbacks import Callback
from tlkit.data import create_transforms
from tlkit.tta import tta_views

CLASSES = ["cardboard", "glass", "metal"]


@pytest.fixture
def data(tmp_path):
    return (ImageFolderDataset(copy_sample(tmp_path / "train", CLASSES, 4)),
            ImageFolderDataset(copy_sample(tmp_path / "val", CLASSES, 2, offset=10)))


def deterministic(tuner: FineTuner) -> FineTuner:
    tuner.train_transform = tuner.eval_transform
    return tuner


# -- augmentation -------------------------------------------------------------------------------
def test_auto_augment_policies_come_from_torchvision_and_timm():
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from torchvision.transforms import ColorJitter, TrivialAugmentWide

    def kinds(augment):
        return [type(t) for t in create_transforms(SMALL, augment)[0].transforms]

    assert TrivialAugmentWide in kinds(AugmentConfig(auto_augment="trivialaugment"))
    assert RandAugment in kinds(AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1"))
    plain = kinds(AugmentConfig())
    assert ColorJitter in plain and TrivialAugmentWide not in plain and RandAugment not in plain
    assert ColorJitter not in kinds(AugmentConfig(auto_augment="trivialaugment"))  # as timm: one or the other
    assert RandomErasing in kinds(AugmentConfig(re_prob=0.25)) and RandomErasing not in plain
    with pytest.raises(ValidationError, match="trivial-augment"):
        AugmentConfig(auto_augment="trivial-augment")


# -- mixup --------------------------------------------------------------------------------------
def test_mixup_trains_on_convex_mixes_of_each_batch_with_its_reverse(data):
    from tlkit.data import skip_none_collate

    train, _ = data
    tuner = deterministic(tiny_tuner(CLASSES, epochs=1, batch_size=12, mixup_alpha=1.0))
    seen, batches = [], []
    tuner.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))

    def record(items):  # the batch as loaded, before mixing
        out = skip_none_collate(items)
        batches.append(out[0].clone())
        return out

    # A DataLoader of the user's own is trained on as it is: the seam to see the batch before mixing.
    loader = torch.utils.data.DataLoader(train.with_transform(tuner.train_transform), batch_size=12,
                                         shuffle=True, drop_last=True, collate_fn=record)
    tuner.fit(loader)
    (x,), (x0,) = seen, batches
    flipped = x0.flip(0)
    diff = x0 - flipped
    mask = diff.abs() > 0.1
    lam = float(((x - flipped)[mask] / diff[mask]).median())
    assert 0 < lam < 1 and not torch.allclose(x, x0)
    torch.testing.assert_close(x, lam * x0 + (1 - lam) * flipped, atol=1e-4, rtol=1e-4)


def test_mixup_needs_an_even_batch_size():
    with pytest.raises(ValidationError, match="batch_size must be even"):
        TrainConfig(mixup_alpha=0.2, batch_size=31)


# -- class weights ------------------------------------------------------------------------------
def test_balanced_class_weights_follow_sklearn_and_weight_the_loss(tmp_path):
    root = copy_sample(tmp_path / "a", ("cardboard", "glass"), 4)
    copy_sample(root, ("metal",), 2)
    train = ImageFolderDataset(root)
    tuner = deterministic(tiny_tuner(CLASSES, epochs=1, batch_size=10, lr=1e-12, class_weights="balanced"))
    w = tuner.class_weights(train)
    from sklearn.utils.class_weight import compute_class_weight

    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=np.array(train.targets))
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float32))
    # the recorded loss of the single batch is the weighted cross-entropy of the untrained model
    x = torch.stack([tuner.eval_transform(__import__("tlkit").load_image(p, draft_size=tuner.draft_size))
                     for p, _ in train.samples])
    y = torch.tensor(train.targets)
    with torch.no_grad():
        tuner.model.train()
        logits = tuner.model(x)
    want = nn.functional.cross_entropy(logits, y, weight=w)
    unweighted = nn.functional.cross_entropy(logits, y)
    assert abs(float(want - unweighted)) > 1e-3  # the check below can tell them apart
    (record,) = tuner.fit(train)
    assert record["train_loss"] == pytest.approx(float(want), rel=1e-4)


def test_class_weight_list_must_match_the_classes():
    tuner = tiny_tuner(CLASSES, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="2 values but there are 3 classes"):
        tuner.class_weights(None)


# -- EMA ----------------------------------------------------------------------------------------
def test_ema_weights_are_the_warmed_up_average_of_the_trajectory(data, tmp_path):
    train, val = data
    steps: list[torch.Tensor] = []
    plain = deterministic(tiny_tuner(CLASSES, epochs=2))
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: steps.append(plain.model.fc.weight.detach().clone()))
    try:
        plain.fit(train)
    finally:
        handle.remove()
    decay = 0.9
    ema = None
    for k, w in enumerate(steps, start=1):  # timm ModelEmaV3 warm-up: 1 - k^-3/4, capped
        d = min(1 - k ** -0.75, decay) if k > 1 else 0.0
        ema = w if ema is None else d * ema + (1 - d) * w
    tuner = deterministic(tiny_tuner(CLASSES, epochs=2, ema_decay=decay, output_dir=tmp_path / "run"))
    tuner.fit(train, val)
    torch.testing.assert_close(plain.model.fc.weight, steps[-1])
    assert not torch.allclose(tuner.model.fc.weight, steps[-1], atol=1e-4)
    torch.testing.assert_close(tuner.model.fc.weight, ema, atol=1e-5, rtol=1e-4)
    # the run's checkpoint holds the averaged weights too
    saved = FineTuner.load(tmp_path / "run" / "last.safetensors", progress=False)
    torch.testing.assert_close(saved.model.fc.weight, tuner.model.fc.weight)


def test_ema_resume_matches_an_uninterrupted_run(data, tmp_path):
    train, val = data
    whole = deterministic(tiny_tuner(CLASSES, epochs=3, ema_decay=0.9, output_dir=tmp_path / "a"))
    whole.fit(train, val)
    first = deterministic(tiny_tuner(CLASSES, epochs=3, ema_decay=0.9, output_dir=tmp_path / "b"))

    class StopAfterSecond(Callback):
        def on_checkpoint_saved(self, tuner, paths):
            if tuner.epoch == 2:
                raise KeyboardInterrupt

    first.callbacks.append(StopAfterSecond())
    with pytest.raises(KeyboardInterrupt):
        first.fit(train, val)
    again = deterministic(tiny_tuner(CLASSES, epochs=3, ema_decay=0.9, output_dir=tmp_path / "b"))
    again.fit(train, val, resume=True)
    for k, v in whole.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[k], v, rtol=0, atol=0, msg=k)


# -- early stopping -----------------------------------------------------------------------------
def test_early_stopping_waits_patience_epochs_and_restarts_at_a_phase(data, tmp_path):
    train, val = data
    # lr 1e-12 and BatchNorm statistics frozen: top-1 never improves after epoch 0
    flat = tiny_tuner(CLASSES, epochs=8, lr=1e-12, early_stopping_patience=2, output_dir=tmp_path / "a",
                      policy=FreezePolicy(batchnorm="frozen"))
    hist = flat.fit(train, val)
    assert [r["epoch"] for r in hist] == [1, 2, 3] and hist[-1]["early_stop"] is True
    assert flat.epoch == 3
    assert len((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) == 3
    # a phase starting at epoch 2 gets its own patience: stop at epoch 3, not 2
    phased = tiny_tuner(CLASSES, epochs=8, lr=1e-12, early_stopping_patience=2,
                        policy=FreezePolicy.linear_probe(batchnorm="frozen").then(2, depth=0))
    assert [r["epoch"] for r in phased.fit(train, val)] == [1, 2, 3, 4]
    # without patience every epoch runs
    assert len(tiny_tuner(CLASSES, epochs=4, lr=1e-12).fit(train, val)) == 4


# -- test-time augmentation ---------------------------------------------------------------------
def test_hflip_tta_averages_probabilities_of_the_image_and_its_mirror(data):
    train, val = data
    tuner = tiny_tuner(CLASSES, epochs=1)
    tuner.fit(train)
    from tlkit import load_image

    x = torch.stack([tuner.eval_transform(load_image(p, draft_size=tuner.draft_size)) for p, _ in val.samples])
    y = torch.tensor(val.targets)
    tuner.model.eval()
    with torch.no_grad():
        probs = (tuner.model(x).softmax(1) + tuner.model(x.flip(-1)).softmax(1)) / 2
    m = tuner.evaluate(val, tta="hflip")
    assert m.top1 == pytest.approx(float((probs.argmax(1) == y).float().mean()))
    assert m.loss == pytest.approx(float(nn.functional.nll_loss(probs.log(), y)), rel=1e-5)
    assert m.loss != pytest.approx(tuner.evaluate(val).loss, rel=1e-5)
    (pred,) = tuner.predict([val.samples[0][0]], tta="hflip")
    assert pred.probabilities == pytest.approx(dict(zip(CLASSES, probs[0].tolist())), abs=1e-6)
    with pytest.raises(ValueError, match="unknown tta mode"):
        tuner.predict([val.samples[0][0]], tta="flip")


def test_multi_crop_views_are_ten_zoomed_crops_and_mirrors():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    views = tta_views(x, "multi-crop")
    assert len(views) == 10 and all(v.shape == x.shape for v in views)
    torch.testing.assert_close(views[5], views[0].flip(-1))
    # the top-left crop starts at the input's top-left pixel and keeps its monotone layout
    assert float(views[1][0, 0, 0, 0]) == pytest.approx(float(x[0, 0, 0, 0]), abs=8)
    assert not torch.equal(views[0], x)
    assert len(tta_views(x, "hflip")) == 2 and tta_views(x, "none")[0] is x


# -- LR finder ----------------------------------------------------------------------------------
def test_lr_finder_sweeps_exponentially_and_restores_the_model(data, tmp_path):
    train, _ = data
    tuner = tiny_tuner(CLASSES, batch_size=4, policy=FreezePolicy.linear_probe())
    before = {k: v.clone() for k, v in tuner.model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in tuner.model.named_parameters()}
    rng = torch.get_rng_state()
    r = tuner.lr_find(train, start_lr=1e-5, end_lr=1e-1, num_steps=9)
    assert not r.diverged and len(r.lrs) == len(r.losses) == len(r.raw_losses) == 9
    assert r.lrs[0] == pytest.approx(1e-5) and r.lrs[-1] == pytest.approx(1e-1)
    ratios = [b / a for a, b in zip(r.lrs, r.lrs[1:])]
    assert ratios == pytest.approx([10 ** 0.5] * 8)
    assert (r.suggestion in r.lrs) != (r.warning is not None and r.suggestion is None)
    for k, v in tuner.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: p.requires_grad for n, p in tuner.model.named_parameters()} == grads
    assert torch.equal(torch.get_rng_state(), rng)
    blown = tuner.lr_find(train, start_lr=1e-3, end_lr=1e6, num_steps=30)
    assert blown.diverged and len(blown.lrs) < 30
    png = tmp_path / "lr.png"
    r.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_steepest_suggestion_is_where_the_loss_falls_fastest():
    from tlkit.lr_finder import LRFinderResult

    lrs = [10.0 ** (k / 2) for k in range(-10, 1)]
    losses = [2.0, 2.0, 1.99, 1.9, 1.5, 1.0, 0.9, 0.85, 0.84, 3.0, 9.0]
    assert LRFinderResult.steepest(lrs, losses) == lrs[4]  # between 1.9 and 1.0
    assert LRFinderResult.steepest(lrs[:3], losses[:3]) is None


# -- presets and overrides ----------------------------------------------------------------------
def test_linear_probe_preset_trains_from_cached_features():
    cfg = apply_recipe(RunConfig(), "linear-probe")
    assert cfg.train.feature_cache and cfg.train.feature_views == 0 and cfg.freeze.depth == -1


def test_finetune_strong_preset_sets_every_block():
    cfg = apply_recipe(RunConfig(), "finetune-strong")
    t, a = cfg.train, cfg.data.augment
    assert (t.epochs, t.lr, t.ema_decay, t.class_weights, t.label_smoothing) == (15, 2e-3, 0.998, "balanced", 0.1)
    assert t.unfreeze_warmup_epochs == 1.0
    assert (a.auto_augment, a.re_prob) == ("trivialaugment", 0.1)
    assert cfg.freeze.boundaries() == [2]
    assert cfg.freeze.at(1).depth == -1 and cfg.freeze.at(2).depth == -5
    assert cfg.freeze.at(2).layer_decay == 0.6 and cfg.freeze.at(2).batchnorm == "frozen"
    with pytest.raises(ValueError, match="finetune-strong"):
        apply_recipe(RunConfig(), "finetune-stronger")


def test_with_overrides_parses_yaml_values_and_names_bad_keys():
    cfg = RunConfig().with_overrides(["train.epochs=3", "data.augment.auto_augment=trivialaugment",
                                      "train.class_weights=[1, 2, 3]"])
    assert cfg.train.epochs == 3 and cfg.data.augment.auto_augment == "trivialaugment"
    assert cfg.train.class_weights == [1.0, 2.0, 3.0]
    with pytest.raises(ValidationError, match="epoch"):
        RunConfig().with_overrides(["train.epoch=3"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        RunConfig().with_overrides(["train.epochs"])
    assert math.isclose(json.loads(RunConfig().model_dump_json())["train"]["lr"], 1e-3)


def test_unfreeze_warmup_ramps_the_lr_of_groups_that_join(data):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from tlkit.schedule import cosine_lr_factor

    train, _ = data
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append([(g["group"], g["lr"], g["lr_scale"], "joined_step" in g)
                                               for g in opt.param_groups]))
    try:
        policy = FreezePolicy.linear_probe().then(1, depth=0)
        tiny_tuner(CLASSES, epochs=2, batch_size=4, lr=1e-2, policy=policy, unfreeze_warmup_epochs=1.0).fit(train)
    finally:
        handle.remove()
    assert len(seen) == 6  # 12 images, batches of 4: 3 steps per epoch
    for step, groups in enumerate(seen):
        factor = cosine_lr_factor(step, 6, 0, 0.01)
        for name, lr, scale, joined in groups:
            ramp = (step - 3 + 1) / 4 if joined else 1.0  # joined at step 3, over 3 steps
            assert lr == pytest.approx(1e-2 * scale * factor * ramp), (step, name)
    assert any(j for _, _, _, j in seen[3]) and not any(j for _, _, _, j in seen[0])


def test_label_smoothing_is_the_mixture_of_nll_and_the_uniform_cross_entropy(tmp_path):
    train = ImageFolderDataset(copy_sample(tmp_path / "a", CLASSES, 3))
    tuner = deterministic(tiny_tuner(CLASSES, epochs=1, batch_size=9, lr=1e-12, label_smoothing=0.3))
    from tlkit import load_image

    x = torch.stack([tuner.eval_transform(load_image(p, draft_size=tuner.draft_size)) for p, _ in train.samples])
    y = torch.tensor(train.targets)
    with torch.no_grad():
        tuner.model.train()
        logp = tuner.model(x).log_softmax(1)
    want = (-(0.7 * logp[torch.arange(9), y] + 0.3 * logp.mean(1))).mean()
    (record,) = tuner.fit(train)
    assert record["train_loss"] == pytest.approx(float(want), rel=1e-4)
    assert abs(float(want) - float(-logp[torch.arange(9), y].mean())) > 1e-3  # smoothing changed it


def test_input_resolution_comes_from_the_data_config_override():
    import timm

    from tlkit import DataConfigOverrides, HeadReplacer, resolve_data_config

    model = HeadReplacer(3).apply(timm.create_model("test_resnet"))
    cfg = resolve_data_config(model, DataConfigOverrides(input_size=(3, 96, 96), crop_pct=0.875))
    tuner = FineTuner(model, CLASSES, config=TrainConfig(progress=False), data_config=cfg)
    from PIL import Image

    im = Image.new("RGB", (300, 200))
    assert tuner.train_transform(im).shape == tuner.eval_transform(im).shape == (3, 96, 96)
    assert tuner.draft_size == 109  # floor(96 / 0.875)
