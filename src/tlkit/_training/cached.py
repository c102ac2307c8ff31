"""Pooled features of a frozen backbone for cached-feature epochs, shared across ranks."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from tlkit._introspect import classifier_module_names
from tlkit._loaders import eval_loader, prepare_dataset
from tlkit._rng import seeded
from tlkit.distributed import broadcast_object, gather_shards
from tlkit.features import FeatureCache, extract_features, weights_digest

if TYPE_CHECKING:
    from tlkit._protocols import Run
    from tlkit.data import ImageFolderDataset

__all__ = ["cached_features"]

Features = tuple[torch.Tensor, torch.Tensor]


def _key_and_transform(tuner: Run, data: ImageFolderDataset, view: int | None):
    if view is None:
        transform, desc, ctx = tuner.eval_transform, f"eval|{tuner.eval_transform!r}|draft={tuner.draft_size}", None
    else:
        seed = tuner.config.seed * 1_000_003 + view
        transform, desc, ctx = tuner.train_transform, f"train|{tuner.train_transform!r}|view={view}|seed={seed}", seeded(seed)
    head = tuple(f"{n}." for n in classifier_module_names(tuner.model))
    key = FeatureCache.key({"name": tuner.backbone.name, "model_kwargs": tuner.backbone.model_kwargs},
                           weights_digest(tuner.model, exclude=head), tuner.data_config, desc, data.samples)
    return key, transform, ctx


def cached_features(tuner: Run, data: ImageFolderDataset, view: int | None = None) -> Features:
    """See `FineTuner.cached_features`."""
    key, transform, ctx = _key_and_transform(tuner, data, view)
    rt = tuner.runtime

    def compute() -> Features:
        dataset = prepare_dataset(data, tuner.classes, transform, tuner.draft_size if view is None else None)
        loader, sharded = eval_loader(dataset, tuner.eval_batch_size, dist=tuner.dist,
                                      num_workers=tuner.config.num_workers, device=rt.device)
        bar = (lambda it: tqdm(it, desc="features", leave=False, disable=None)) if tuner.config.bars and tuner.is_main else None
        with ctx() if ctx else contextlib.nullcontext():
            features = extract_features(tuner.model, loader, rt.to_device, rt.autocast, bar)
        return gather_shards(features, len(dataset)) if sharded else features

    cache = tuner.feature_cache
    if tuner.dist is None:
        return cache.get_or_compute(key, compute)
    # Rank 0 decides hit or miss (and sends what it read) so all ranks take the same path,
    # even when their disks differ; only rank 0 writes the cache file.
    found = cache.lookup(key, disk=False)  # memory is the same on every rank
    if found is not None:
        return found
    found = broadcast_object(cache.lookup(key) if tuner.is_main else None)
    if found is not None:
        cache.store(key, found, write=False)
        return found
    cache.misses += 1
    value = compute()
    cache.store(key, value, write=tuner.is_main)
    return value
