"""DataLoaders for training and evaluation: shuffling shared with torchrun, sharding, sizes."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from tlkit.data import skip_none_collate
from tlkit.distributed import DistributedContext, shard_indices

__all__ = ["BalancedSampler", "train_loader", "eval_loader", "dataset_length", "sample_labels", "steps_per_epoch",
           "shuffle_seed"]


def shuffle_seed(seed: int) -> int:
    """The sampler seed of a run with ``TrainConfig.seed == seed`` (kept apart from the model's seed)."""
    return seed * 100_003


def dataset_length(data: Any) -> int:
    """Number of samples in a dataset, or in a DataLoader's dataset."""
    return len(data.dataset) if isinstance(data, DataLoader) else len(data)


def steps_per_epoch(data: Any, batch_size: int, dist: DistributedContext | None) -> int:
    """Optimizer steps in one epoch of `train_loader` over ``data`` (a user's DataLoader: its length).

    Under torchrun the sampler deals ``len(data) // world_size`` images to each process, and a
    last partial batch is dropped whenever there is more than one batch.
    """
    if isinstance(data, DataLoader):
        return len(data)
    if isinstance(data, torch.utils.data.IterableDataset):  # a ShardDataset counts this process's samples
        return max(1, math.ceil(len(data) / batch_size))
    n_local = len(data) // dist.world_size if dist is not None else len(data)
    return n_local // batch_size if n_local > batch_size else math.ceil(n_local / batch_size)


def _loader(dataset: Dataset, batch_size: int, sampler: Any, generator: torch.Generator | None, drop_last: bool,
            num_workers: int, device: torch.device, worker_init_fn: Any = None) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, generator=generator, drop_last=drop_last,
        num_workers=num_workers, pin_memory=device.type == "cuda",
        worker_init_fn=worker_init_fn if num_workers > 0 else None,
        collate_fn=skip_none_collate,  # a file that fails to load costs a sample, not the epoch
    )


def sample_labels(dataset: Any) -> list[int]:
    """Class index of every sample: an `ImageFolderDataset`'s ``targets``, a TensorDataset's second tensor."""
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return dataset.tensors[1].tolist()
    labels = getattr(dataset, "targets", None)
    if labels is None:
        raise ValueError("sampler='balanced' needs the class of every sample: give an ImageFolderDataset "
                         "(or a dataset with a .targets list), or pass your own DataLoader")
    return list(labels)


class BalancedSampler(torch.utils.data.Sampler):
    """``len(labels) // world`` indices per process, drawn with replacement, weight 1 / class size.

    One draw of ``len(labels)`` indices (``torch.multinomial`` seeded ``seed + epoch``, the
    same on every rank) is dealt out ``rank::world``, like `train_loader`'s permutation.
    """

    def __init__(self, labels: list[int], seed: int, epoch: int, rank: int = 0, world: int = 1) -> None:
        counts: dict[int, int] = {}
        for y in labels:
            counts[y] = counts.get(y, 0) + 1
        self.weights = torch.tensor([1.0 / counts[y] for y in labels], dtype=torch.float64)
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.num_samples = len(labels) // world

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, len(self.weights), replacement=True, generator=g)
        return iter(draw[self.rank::self.world][: self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples


def train_loader(dataset: Any, batch_size: int, *, seed: int, epoch: int, dist: DistributedContext | None,
                 num_workers: int, device: torch.device, worker_init_fn: Any = None,
                 sampler: str = "shuffle") -> DataLoader:
    """A shuffling (or class-balanced) loader for epoch index ``epoch``; a DataLoader passed in is returned as it is.

    One permutation (randperm seeded ``shuffle_seed(seed) + epoch``) is dealt out
    ``rank::world_size``: global batch k of a torchrun run holds the images of batch k of one
    process with ``batch_size * world_size``, so both take the same steps. ``sampler="balanced"``
    deals a `BalancedSampler` draw the same way, with the same number of steps.
    """
    if isinstance(dataset, DataLoader):
        return dataset
    if isinstance(dataset, torch.utils.data.IterableDataset):  # shards: the dataset deals and shuffles itself
        if sampler == "balanced":
            raise ValueError("sampler='balanced' needs indexable data; shards are streamed (use class_weights)")
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        return _loader(dataset, batch_size, None, None, False, num_workers, device, worker_init_fn)
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    if sampler == "balanced":
        sampler = BalancedSampler(sample_labels(dataset), shuffle_seed(seed), epoch, rank, world)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                     seed=shuffle_seed(seed), drop_last=True)
        sampler.set_epoch(epoch)
    # The generator seeds the worker processes only; the sampler owns the order.
    generator = torch.Generator().manual_seed(shuffle_seed(seed) + epoch)
    return _loader(dataset, batch_size, sampler, generator, len(sampler) > batch_size, num_workers, device,
                   worker_init_fn)


def eval_loader(dataset: Any, batch_size: int, *, dist: DistributedContext | None, num_workers: int,
                device: torch.device, worker_init_fn: Any = None) -> tuple[DataLoader, bool]:
    """An in-order loader, and whether it covers only this rank's shard (then metrics are summed over ranks)."""
    if isinstance(dataset, DataLoader):
        return dataset, False
    if isinstance(dataset, torch.utils.data.IterableDataset):  # shards: each rank already reads its own
        return _loader(dataset, batch_size, None, None, False, num_workers, device, worker_init_fn), dist is not None
    sharded = dist is not None
    if sharded:
        dataset = Subset(dataset, shard_indices(len(dataset), dist.rank, dist.world_size))
    return _loader(dataset, batch_size, None, None, False, num_workers, device, worker_init_fn), sharded


def prepare_dataset(data: Any, classes: list[str], transform: Any, draft_size: int | None = None) -> Any:
    """An `ImageFolderDataset` with ``transform`` (and JPEG draft decoding), checked against ``classes``.

    Other datasets and DataLoaders are returned as they are: they bring their own transforms.

    Raises:
        ValueError: the dataset's classes differ from the model's.
    """
    from tlkit.data import ImageFolderDataset
    from tlkit.shards import ShardDataset

    if isinstance(data, (ImageFolderDataset, ShardDataset)):
        if data.classes != classes:
            raise ValueError(f"dataset classes {data.classes} differ from the model's classes {classes}")
        return data.with_transform(transform, draft_size)
    return data
