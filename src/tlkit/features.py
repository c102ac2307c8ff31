"""Run a frozen backbone once and cache its pooled features, so a linear probe trains from the cache.

A linear probe recomputes the same frozen forward pass on every epoch. When only the classifier
trains and the inputs are deterministic (the eval transform, or a fixed number of augmented
views per image), the pooled pre-logit features ``forward_head(forward_features(x),
pre_logits=True)`` are computed once and the classifier trains on them directly.

Entries are keyed by everything that changes the features: backbone name and timm kwargs, a
digest of the frozen weights, the data config, the transform (and view index), and each file's
path, size and modification time. Any change gives a new key, so a stale entry is never used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlkit._rng import seeded  # noqa: F401  (its old home; tlkit._rng owns it)
from tlkit.checkpoint import atomic_write_bytes, tensors_sha256

__all__ = ["FeatureCache", "extract_features", "weights_digest", "classifier_is_last_step"]


def weights_digest(model: nn.Module, exclude: tuple[str, ...] = ()) -> str:
    """`tlkit.checkpoint.tensors_sha256` of the model's ``state_dict``, skipping names that start with ``exclude``."""
    return tensors_sha256({k: v for k, v in model.state_dict().items() if not k.startswith(exclude)})


@torch.no_grad()
def classifier_is_last_step(model: nn.Module, x: torch.Tensor, atol: float = 1e-4) -> bool:
    """Whether ``model(x)`` equals ``get_classifier()(forward_head(..., pre_logits=True))`` in eval mode.

    True for most timm models; False for distilled twin heads or heads that do more after the
    pre-logits, where features cannot stand in for the forward pass.
    """
    head = model.get_classifier()
    if isinstance(head, (tuple, list)):
        return False
    was = model.training
    model.eval()
    try:
        full = model(x)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        return pre.ndim == 2 and torch.allclose(head(pre), full, atol=atol, rtol=1e-4)
    finally:
        model.train(was)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    to_device: Callable[[torch.Tensor], torch.Tensor],
    autocast: Callable[[], Any],
    progress: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features of every image, in loader order, with the model in eval mode.

    Returns:
        ``(features, labels)``: float32 ``(N, num_features)`` on the CPU and int64 ``(N,)``.
    """
    was = model.training
    model.eval()
    feats, labels = [], []
    batches = progress(loader) if progress else loader
    for batch in batches:
        if batch is None:  # every file of the batch failed to load (see tlkit.data.skip_none_collate)
            continue
        x, y = batch
        with autocast():
            f = model.forward_head(model.forward_features(to_device(x)), pre_logits=True)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    model.train(was)
    return torch.cat(feats), torch.cat(labels)


class FeatureCache:
    """Cached features in memory and, with ``cache_dir``, on disk as safetensors files.

    Args:
        cache_dir: folder for ``<key>.safetensors`` files; ``None`` keeps entries in memory only.
    """

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(
        backbone: dict[str, Any],
        digest: str,
        data_config: dict[str, Any],
        transform: str,
        samples: list[tuple[Path, int]],
    ) -> str:
        """The cache key (sha256 hex) of one dataset under one model and transform.

        Args:
            backbone: name and timm kwargs.
            digest: `weights_digest` of the frozen part.
            data_config: the timm data config.
            transform: a description of the transform and view (``repr`` plus view index).
            samples: ``(path, label)`` pairs; each file's size and modification time count.
        """
        h = hashlib.sha256()
        h.update(json.dumps([backbone, digest, data_config, transform], sort_keys=True, default=str).encode())
        for path, label in samples:
            st = Path(path).stat()
            h.update(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{label};".encode())
        return h.hexdigest()

    def lookup(self, key: str, disk: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Features for ``key`` from memory, else (with ``disk``) from disk, kept in memory then; ``None`` on a miss.

        A damaged cache file counts as a miss: it is recomputed, never trusted.
        """
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.cache_dir / f"{key}.safetensors" if self.cache_dir and disk else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            try:
                d = load_file(str(path))
            except Exception:  # noqa: BLE001 - any unreadable file is a miss
                return None
            self._memory[key] = (d["features"], d["labels"])
            self.hits += 1
            return self._memory[key]
        return None

    def store(self, key: str, value: tuple[torch.Tensor, torch.Tensor], write: bool = True) -> None:
        """Keep ``value`` in memory and, with ``cache_dir`` and ``write``, on disk (atomically)."""
        self._memory[key] = value
        if write and self.cache_dir is not None:
            from safetensors.torch import save

            atomic_write_bytes(self.cache_dir / f"{key}.safetensors",
                               save({"features": value[0].contiguous(), "labels": value[1].contiguous()}))

    def get_or_compute(
        self, key: str, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features for ``key``: from memory, else from disk, else ``compute()`` (then stored)."""
        value = self.lookup(key)
        if value is None:
            self.misses += 1
            value = compute()
            self.store(key, value)
        return value
