"""Multi-process training on ``torch.distributed``, as launched by ``torchrun``.

`FineTuner` calls `init_distributed` itself: under ``torchrun --nproc_per_node N`` (which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) it joins the
process group, with the NCCL backend on CUDA and gloo on the CPU. Nothing here is home-made
communication: sharding and reductions are ``torch.distributed`` collectives.

Conventions (those of timm's ``train.py`` and Lightning):

* ``TrainConfig.batch_size`` is per process; the global batch is ``batch_size * world_size``.
* Rank 0 alone writes files and prints progress.
* Metrics are reduced as counts (confusion-matrix entries, loss sums, image counts), never as
  averages of per-rank averages, so they equal a one-process evaluation of the same data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "init_distributed",
    "destroy_distributed",
    "distributed_context",
    "launched_by_torchrun",
    "all_reduce_sum",
    "shard_indices",
    "gather_shards",
    "all_gather_object",
    "broadcast_object",
    "barrier",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the process group.

    Attributes:
        rank: global rank, ``0 .. world_size - 1``.
        world_size: number of processes in all nodes.
        local_rank: rank on this node (the CUDA device index under ``torchrun``).
        backend: ``"nccl"`` or ``"gloo"``.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files and prints."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def distributed_context() -> DistributedContext | None:
    """The context of an initialised process group with more than one process, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DistributedContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend=str(dist.get_backend()),
    )


def init_distributed(device: str | torch.device = "auto", backend: str | None = None) -> DistributedContext | None:
    """Join the process group that ``torchrun`` describes, once; return the context.

    A group the caller initialised already is used as it is. Without ``torchrun`` (no
    ``WORLD_SIZE`` > 1) and without a group, this does nothing and returns ``None``: one process.

    Args:
        device: the training device setting; ``"auto"`` or ``"cuda"`` with CUDA available picks
            ``cuda:LOCAL_RANK`` and the NCCL backend, anything else gloo.
        backend: force a backend (``"gloo"``, ``"nccl"``).

    Returns:
        The `DistributedContext`, or ``None`` for a single process.

    Raises:
        RuntimeError: ``torch.distributed`` is not available in this torch build.
    """
    if dist.is_available() and dist.is_initialized():
        return distributed_context()
    if not launched_by_torchrun():
        return None
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    use_cuda = str(device) in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return distributed_context()


def destroy_distributed() -> None:
    """Leave the process group, if one is initialised (call once at the end of a torchrun script).

    Exiting without it can make a process abort at interpreter shutdown while a gloo peer
    still holds the connection.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(*values: torch.Tensor | float) -> list[torch.Tensor]:
    """Sum tensors (or numbers) over all processes; float64 on the CPU for exact counts.

    Returns:
        The summed values, one tensor per argument (unchanged copies in a single process).
    """
    out = [torch.as_tensor(v, dtype=torch.float64).detach().clone().cpu() for v in values]
    ctx = distributed_context()
    if ctx is None:
        return out
    flat = torch.cat([t.reshape(-1) for t in out])
    if ctx.backend == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat)
    flat = flat.cpu()
    result, i = [], 0
    for t in out:
        result.append(flat[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return result


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Indices ``rank, rank + world_size, ...`` of ``n`` items: every item on exactly one process.

    Unlike ``DistributedSampler``, nothing is padded or dropped, so counts reduced over the
    shards equal those of the whole set.
    """
    return list(range(rank, n, world_size))


def gather_shards(tensors: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    """Reassemble per-rank results over `shard_indices` shards into whole tensors, on every rank.

    Args:
        tensors: this rank's results, each with first dimension = the number of its items, in
            `shard_indices` order (e.g. features ``(n_r, D)`` and labels ``(n_r,)``), CPU.
        n: the total number of items.

    Returns:
        The whole tensors, first dimension ``n``, rows in the unsharded order. If some rank
        returned fewer rows than its shard (items skipped, e.g. unreadable files), rows are
        concatenated in rank order instead, which keeps every row with its own label.
    """
    ctx = distributed_context()
    if ctx is None:
        return tuple(tensors)
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, tuple(t.cpu() for t in tensors))
    if any(len(p[0]) != len(shard_indices(n, r, ctx.world_size)) for r, p in enumerate(parts)):
        return tuple(torch.cat([p[k] for p in parts]) for k in range(len(tensors)))
    out = []
    for k in range(len(tensors)):
        whole = parts[0][k].new_empty((n, *parts[0][k].shape[1:]))
        for r, p in enumerate(parts):
            whole[r::ctx.world_size] = p[k]
        out.append(whole)
    return tuple(out)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    ctx = distributed_context()
    if ctx is None:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (picklable objects; identity in one process)."""
    if distributed_context() is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if distributed_context() is not None:
        dist.barrier()
