"""One training step, shared by `FineTuner.fit` and `FineTuner.lr_find`.

Forward under autocast, loss in float32, a NaN/inf guard that leaves the model as it was,
backward (through a GradScaler for float16), gradient clipping, the optimizer step and the EMA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tlkit._introspect import running_stats
from tlkit._runtime import Runtime
from tlkit.distributed import DistributedContext, all_reduce_sum

__all__ = ["NonFiniteLossError", "TrainStep"]


class NonFiniteLossError(FloatingPointError):
    """The loss of a step was NaN or infinite; the step was not taken.

    Attributes:
        loss: the offending value.
    """

    def __init__(self, message: str, loss: float) -> None:
        super().__init__(message)
        self.loss = loss


class TrainStep:
    """One optimizer step on a batch.

    Args:
        model: the model whose trainable parameters the optimizer holds.
        optimizer: the optimizer (its LRs are set by the caller).
        runtime: device, autocast and memory format.
        criterion: loss of ``(logits float32 (B, C), target (B,) int64 or (B, C) soft)``.
        scaler: a GradScaler for float16 autocast, else ``None``.
        grad_clip_norm: clip the global gradient norm to this, or ``None``.
        mixup: timm ``Mixup`` applied to even-sized batches, or ``None``.
        ema: timm ``ModelEmaV3`` updated after each step, or ``None``.
        dist: the process group context: a non-finite loss on any rank stops every rank.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime,
                 criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, scaler: Any = None,
                 grad_clip_norm: float | None = None, mixup: Any = None, ema: Any = None,
                 dist: DistributedContext | None = None) -> None:
        self.model, self.optimizer, self.runtime, self.criterion = model, optimizer, runtime, criterion
        self.scaler, self.grad_clip_norm, self.mixup, self.ema, self.dist = scaler, grad_clip_norm, mixup, ema, dist
        self._stats = running_stats(model)

    def __call__(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 step: int, *, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Train on ``(x, y)``: images float32 ``(B, 3, H, W)``, labels int64 ``(B,)``.

        Args:
            forward: the module to run (the model, its DDP/compiled wrapper, or the classifier
                alone on cached features).
            step: the optimizer steps taken so far (updates the EMA's warm-up).
            part: ``(i, k)``: this batch is micro-batch ``i`` of ``k`` whose gradients one
                optimizer step sums (gradient accumulation): the loss is scaled by ``1 / k``,
                gradients are cleared before micro-batch 0 and the optimizer steps after
                micro-batch ``k - 1``.

        Returns:
            The loss, a float32 scalar tensor (detached).

        Raises:
            NonFiniteLossError: the loss is NaN or infinite; weights, optimizer state and
                BatchNorm statistics are left as they were before the step.
        """
        x, y = self.runtime.to_device(x), y.to(self.runtime.device)
        target = y
        if self.mixup is not None and x.shape[0] % 2 == 0:
            x, target = self.mixup(x, y)  # soft targets (B, num_classes)
        # The forward pass updates BatchNorm statistics even when the loss turns out NaN; keep
        # a copy so a failing step leaves the model as it was.
        saved = [t.clone() for t in self._stats]
        with self.runtime.autocast():
            logits = forward(x)
        loss = self.criterion(logits.float(), target)
        self._guard(loss, saved)
        index, parts = part
        if index == 0:
            self.optimizer.zero_grad(set_to_none=True)
        self._backward(loss / parts if parts > 1 else loss)
        if index == parts - 1:
            self._step()
            if self.ema is not None:
                self.ema.update(self.model, step=step + 1)
        return loss.detach()

    def _guard(self, loss: torch.Tensor, saved: list[torch.Tensor]) -> None:
        finite = bool(torch.isfinite(loss))
        if self.dist is not None:  # every rank stops together, none waits in a reduction
            finite = bool(all_reduce_sum(0.0 if finite else 1.0)[0] == 0)
        if not finite:
            with torch.no_grad():
                for t, before in zip(self._stats, saved):
                    t.copy_(before)
            raise NonFiniteLossError(f"loss is {loss.item()}", loss.item())

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if self.grad_clip_norm:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
