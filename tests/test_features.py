import os

import pytest
import torch
from conftest import copy_sample, tiny_tuner

from tlkit import FreezePolicy, ImageFolderDataset

CLASSES = ["cardboard", "glass", "metal"]


@pytest.fixture
def data(tmp_path):
    return (ImageFolderDataset(copy_sample(tmp_path / "train", CLASSES, 4)),
            ImageFolderDataset(copy_sample(tmp_path / "val", CLASSES, 2, offset=10)))


def test_cached_linear_probe_trains_the_same_head_as_the_uncached_path(data):
    train, val = data
    plain = tiny_tuner(CLASSES, policy=FreezePolicy.linear_probe(), epochs=3)
    plain.train_transform = plain.eval_transform  # deterministic inputs on both paths
    plain_hist = plain.fit(train, val)
    cached = tiny_tuner(CLASSES, policy=FreezePolicy.linear_probe(), epochs=3, feature_cache=True)
    cached_hist = cached.fit(train, val)
    assert all(r["cached_features"] for r in cached_hist) and not any(r["cached_features"] for r in plain_hist)
    torch.testing.assert_close(cached.model.fc.weight, plain.model.fc.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached.model.fc.bias, plain.model.fc.bias, atol=1e-5, rtol=1e-4)
    assert [r["top1"] for r in cached_hist] == [r["top1"] for r in plain_hist]
    assert [r["val_loss"] for r in cached_hist] == pytest.approx([r["val_loss"] for r in plain_hist], rel=1e-4)
    # the backbone ran once per dataset (train + val), not once per epoch
    assert cached.feature_cache.misses == 2 and cached.feature_cache.hits == 4


def test_cache_is_used_only_while_only_the_head_trains(data):
    train, val = data
    policy = FreezePolicy.linear_probe().then(2, depth=-2)
    hist = tiny_tuner(CLASSES, policy=policy, epochs=3, feature_cache=True).fit(train, val)
    assert [r["cached_features"] for r in hist] == [True, True, False]


def test_augmented_views_are_fixed_and_cycle(data):
    train, _ = data
    tuner = tiny_tuner(CLASSES, policy=FreezePolicy.linear_probe(), feature_cache=True, feature_views=2)
    v0, _ = tuner.cached_features(train, 0)
    v1, _ = tuner.cached_features(train, 1)
    assert not torch.equal(v0, v1)
    tuner.feature_cache._memory.clear()
    assert torch.equal(tuner.cached_features(train, 0)[0], v0)  # recomputed identically (seeded)


def test_cache_invalidated_by_file_transform_or_weights(data, tmp_path):
    train, _ = data
    tuner = tiny_tuner(CLASSES, feature_cache=True, feature_cache_dir=tmp_path / "cache")
    first, labels = tuner.cached_features(train)
    assert labels.tolist() == train.targets
    tuner.cached_features(train)
    assert (tuner.feature_cache.misses, tuner.feature_cache.hits) == (1, 1)
    # a new process with the same cache folder reads the disk entry
    again = tiny_tuner(CLASSES, feature_cache=True, feature_cache_dir=tmp_path / "cache")
    assert torch.equal(again.cached_features(train)[0], first) and again.feature_cache.hits == 1
    # a file changes
    path = train.samples[0][0]
    other = train.samples[5][0].read_bytes()
    path.write_bytes(other)
    os.utime(path, ns=(1, 1))
    changed, _ = tuner.cached_features(train)
    assert tuner.feature_cache.misses == 2 and not torch.equal(changed[0], first[0])
    # the transform changes
    tuner.eval_transform = tiny_tuner(CLASSES, feature_cache=True).train_transform
    tuner.cached_features(train)
    assert tuner.feature_cache.misses == 3
    # the frozen weights change
    tuner.eval_transform = again.eval_transform
    with torch.no_grad():
        tuner.model.layer1[0].conv1.weight.add_(0.01)
    tuner.cached_features(train)
    assert tuner.feature_cache.misses == 4


def test_frozen_prefix_keeps_no_autograd_graph():
    # With the stem and first stages frozen, their outputs do not require grad, so autograd
    # records nothing there and keeps none of their activations.
    tuner = tiny_tuner(CLASSES, policy=FreezePolicy.freeze_to(-2))
    model = tuner.model
    tuner.policy.apply(model)
    model.train()
    flags = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: flags.__setitem__(n, o.requires_grad))
             for n in ("conv1", "layer1", "layer2", "layer3", "layer4", "fc")]
    model(torch.randn(2, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert flags == {"conv1": False, "layer1": False, "layer2": False, "layer3": False, "layer4": True, "fc": True}


def test_jpeg_draft_is_part_of_the_cache_key_and_can_be_turned_off(data, tmp_path):
    train, _ = data
    drafted = tiny_tuner(CLASSES, feature_cache=True, feature_cache_dir=tmp_path / "cache")
    full = tiny_tuner(CLASSES, feature_cache=True, feature_cache_dir=tmp_path / "cache", jpeg_draft=False)
    assert (drafted.draft_size, full.draft_size) == (73, None)
    a, _ = drafted.cached_features(train)
    b, _ = full.cached_features(train)
    assert full.feature_cache.misses == 1 and full.feature_cache.hits == 0
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)  # same images, slightly different pixels
