"""Choosing a backbone in seconds: transferability scores from frozen features.

`logme` is LogME (You, Liu, Wang & Long, "LogME: Practical Assessment of Pre-trained Models for
Transfer Learning", ICML 2021): the log marginal evidence of a Bayesian linear model from the
features to each one-hot label column, maximised over its prior and noise precisions by
MacKay's fixed-point updates, averaged over classes and divided by the number of images. Higher
means the features separate the classes more linearly, so fine-tuning tends to go further.
`probe_accuracy` (a logistic-regression linear probe on a held-out share) is the baseline
measure. `rank_backbones` reads the images once, extracts every backbone's pooled features and scores them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from tlkit.config import BackboneConfig
    from tlkit.data import ImageFolderDataset

__all__ = ["RankResult", "logme", "probe_accuracy", "rank_backbones"]


def _class_evidence(u_t: np.ndarray, sigma: np.ndarray, y: np.ndarray, n: int, d: int) -> float:
    """Maximised log evidence / n of one target column ``y`` (n,), in the SVD basis of the features."""
    z2 = (u_t @ y) ** 2  # squared coordinates of y along the left singular vectors
    outside = max(float(y @ y - z2.sum()), 0.0)  # the part of y no linear map of the features reaches
    alpha, beta = 1.0, 1.0
    for _ in range(100):  # MacKay's fixed point; converges in ~10 steps in practice
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())
        m2 = float((sigma * z2 / (sigma + t) ** 2).sum())
        res2 = float((z2 / (1 + sigma / t) ** 2).sum()) + outside
        alpha, beta = gamma / (m2 + 1e-10), (n - gamma) / (res2 + 1e-10)
        if abs(alpha / beta - t) / t < 1e-4:
            break
    t = alpha / beta
    m2 = float((sigma * z2 / (sigma + t) ** 2).sum())
    res2 = float((z2 / (1 + sigma / t) ** 2).sum()) + outside
    log_det = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * math.log(alpha)
    evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - 0.5 * log_det
                - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
    return evidence / n


def logme(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """LogME score of ``features`` for ``labels`` (You et al., ICML 2021); higher is better.

    Args:
        features: float ``(N, D)`` pooled pre-logit features.
        labels: int ``(N,)`` class indices in ``[0, C)``.

    Returns:
        The mean over classes of the maximised log evidence per image (a float, usually in
        about [-2, 2]; only differences between backbones on the same data mean something).

    Raises:
        ValueError: fewer than 2 images, or shapes that do not match.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if f.ndim != 2 or y.shape != (f.shape[0],) or f.shape[0] < 2:
        raise ValueError(f"need features (N, D) and labels (N,) with N >= 2, got {f.shape} and {y.shape}")
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma, u_t = s**2, u.T
    return float(np.mean([_class_evidence(u_t, sigma, (y == k).astype(np.float64), n, d) for k in np.unique(y)]))


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, *, val_fraction: float = 0.2, seed: int = 0,
                   weight_decay: float = 1e-4) -> float:
    """Top-1 of a logistic-regression linear probe on a stratified held-out share of the features.

    Features are standardised with the training share's mean and std; the probe is fitted
    with full-batch L-BFGS (well conditioned, no learning rate to tune).

    Args:
        features: float ``(N, D)``.
        labels: int64 ``(N,)``.
        val_fraction: share of each class held out for scoring.
        seed: the split's seed.
        weight_decay: L2 penalty on the weights.

    Returns:
        Top-1 on the held-out share, in [0, 1].
    """
    f, y = torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    val = torch.zeros(len(y), dtype=torch.bool)
    for k in y.unique():
        idx = (y == k).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val[idx[: max(1, round(len(idx) * val_fraction))]] = True
    mean, std = f[~val].mean(0), f[~val].std(0).clamp_min(1e-6)
    x = (f - mean) / std
    head = torch.nn.Linear(f.shape[1], int(y.max()) + 1)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x[~val]), y[~val]) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((head(x[val]).argmax(1) == y[val]).float().mean())


@dataclass
class RankResult:
    """One backbone's scores (see `rank_backbones`).

    Attributes:
        name: the timm model name.
        weights: where its weights came from (a file name, ``"hub"`` or ``"random"``).
        logme: `logme` of its features (higher is better).
        probe_top1: `probe_accuracy` of its features, in [0, 1].
        num_features: feature width ``D``.
        seconds: this backbone's build, forward passes and scoring, wall time (shared decoding excluded).
    """

    name: str
    weights: str
    logme: float
    probe_top1: float
    num_features: int
    seconds: float

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)


class _Views:
    """Applies every backbone's eval transform to one decoded image: a tuple of input tensors."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, image) -> tuple[torch.Tensor, ...]:
        return tuple(t(image) for t in self.transforms)


@dataclass
class _Candidate:
    model: torch.nn.Module
    transform: object
    draft: int
    source: str
    seconds: float  # this backbone's own time so far: build, forward passes, scoring


def _prepare(backbone: BackboneConfig, rt) -> _Candidate:
    from tlkit.backbone import create_backbone, resolve_backbone, resolve_data_config
    from tlkit.data import create_transforms, eval_resize_size

    t0 = time.perf_counter()
    backbone = resolve_backbone(backbone)  # what a run with this backbone would use: file, pad_type, mean/std
    model = create_backbone(backbone).eval()
    channels_last = rt.channels_last and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    model = model.to(rt.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    data_config = resolve_data_config(model, backbone.data_config)
    _, transform = create_transforms(data_config)
    source = backbone.weights.name if backbone.weights is not None else ("hub" if backbone.pretrained else "random")
    return _Candidate(model, transform, eval_resize_size(data_config), source, time.perf_counter() - t0)


def _features(candidates: list[_Candidate], data: ImageFolderDataset, rt, batch_size: int,
              num_workers: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every candidate's pooled features from one pass over the images: each file is decoded once."""
    from tlkit._loaders import eval_loader

    # One decode serves every backbone: decoded at the largest size any eval transform needs.
    views = data.with_transform(_Views([c.transform for c in candidates]), max(c.draft for c in candidates))
    loader, _ = eval_loader(views, batch_size, dist=None, num_workers=num_workers, device=rt.device)
    feats: list[list[torch.Tensor]] = [[] for _ in candidates]
    labels = []
    with torch.no_grad(), rt.cpu_flags():
        for batch in loader:
            if batch is None:  # every file of the batch failed to load (skip_none_collate)
                continue
            xs, y = batch
            labels.append(torch.as_tensor(y))
            for c, x, out in zip(candidates, xs, feats):
                t0 = time.perf_counter()
                with rt.autocast():
                    f = c.model.forward_head(c.model.forward_features(rt.to_device(x)), pre_logits=True)
                out.append(f.float().cpu())
                c.seconds += time.perf_counter() - t0
    return [torch.cat(f) for f in feats], torch.cat(labels)


def rank_backbones(data: ImageFolderDataset, backbones: Sequence[BackboneConfig], *, batch_size: int = 16,
                   device: str = "auto", num_workers: int = 1) -> list[RankResult]:
    """Score each backbone on ``data`` from its frozen pooled features, best LogME first.

    All backbones are built first and the images are read in one pass: each file is decoded
    once (in ``num_workers`` loader processes, overlapping the forward passes) and every
    backbone's own eval transform is applied to it. All models are held in memory together.

    Args:
        data: an `ImageFolderDataset` (every image is used once, with each backbone's eval transform).
        backbones: `BackboneConfig` objects (weights from a file, the hub, or random).
        batch_size: images per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        num_workers: loader processes that decode and transform (0: in this process).

    Returns:
        One `RankResult` per backbone, sorted by `RankResult.logme`, highest first. Its
        ``seconds`` is that backbone's own time (build, forward passes, scoring); the shared
        decoding is not split among them.

    Raises:
        ValueError / RuntimeError / FileNotFoundError: as `tlkit.create_backbone`.
    """
    from tlkit._runtime import Runtime, resolve_device, resolve_precision

    if not backbones:
        raise ValueError("rank_backbones needs at least one backbone")
    dev = resolve_device(device)
    rt = Runtime(dev, resolve_precision("auto", dev), True)
    candidates = [_prepare(b, rt) for b in backbones]
    feats, y = _features(candidates, data, rt, batch_size, num_workers)
    out = []
    for backbone, c, f in zip(backbones, candidates, feats):
        t0 = time.perf_counter()
        scores = logme(f, y), probe_accuracy(f, y)
        out.append(RankResult(backbone.name, c.source, *scores, f.shape[1], c.seconds + time.perf_counter() - t0))
    return sorted(out, key=lambda r: -r.logme)
