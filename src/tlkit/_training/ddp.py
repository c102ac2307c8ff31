"""DistributedDataParallel wrapping for the fit loop (one process: the module itself)."""

from __future__ import annotations

import gc

import torch
from torch import nn

from tlkit.config import TrainConfig
from tlkit.distributed import DistributedContext

__all__ = ["DDPWrapper", "prepare_model_for_ddp"]


class DDPWrapper:
    """Wraps a module in DDP, rebuilt whenever the trainable set changes.

    DDP reduces the gradients of the parameters that require them when it is built, so it is
    rebuilt at a phase boundary, or at the switch between cached-feature and full epochs;
    frozen parameters are never in its buckets.
    """

    def __init__(self, dist: DistributedContext | None, device: torch.device, find_unused_parameters: bool) -> None:
        self.dist, self.device, self.find_unused = dist, device, find_unused_parameters
        self._ddp: nn.Module | None = None
        self._key: tuple | None = None

    def __call__(self, module: nn.Module) -> nn.Module:
        """``module`` under DDP (one process: ``module`` itself)."""
        if self.dist is None:
            return module
        key = (id(module), frozenset(n for n, p in module.named_parameters() if p.requires_grad))
        if key != self._key:
            from torch.nn.parallel import DistributedDataParallel

            self._ddp = self._key = None
            gc.collect()  # the old reducer's autograd hooks go with it
            self._ddp = DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.find_unused)
            self._key = key
        return self._ddp


def prepare_model_for_ddp(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """Check the settings DDP cannot run with and convert BatchNorm to SyncBatchNorm if asked.

    Raises:
        ValueError: ``compile=True`` (not supported under DDP yet), or ``sync_batchnorm`` off CUDA.
    """
    if config.compile:
        raise ValueError("compile=True is not supported under DDP yet; set compile=False for torchrun runs")
    if config.sync_batchnorm and not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        if device.type != "cuda":
            raise ValueError(f"sync_batchnorm needs CUDA: torch's SyncBatchNorm has no {device.type} kernel")
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    return model
