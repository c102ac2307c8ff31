"""Where and how tensors run: device, autocast precision, memory format, denormals, eval mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from tlkit.config import TrainConfig
from tlkit.distributed import DistributedContext, init_distributed

__all__ = ["Runtime", "setup_runtime", "resolve_device", "resolve_precision", "denormals_flushed", "flush_denormal",
           "eval_mode", "make_grad_scaler"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else Apple MPS if available, else CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; ``None`` means plain float32.

    ``"auto"`` picks bfloat16 on CUDA GPUs that support it (else float16) and on CPUs with
    native bfloat16 instructions (AVX512-BF16 / AMX, as reported by oneDNN), else float32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
        except (AttributeError, RuntimeError):
            return None
    return None


def make_grad_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for float16 autocast (its gradients underflow without one), else ``None``.

    bfloat16 has float32's exponent range and needs none. On the CPU a scaler is made where torch
    has one (torch >= 2.3), so the scaled path is exercised without a GPU.
    """
    if amp_dtype != torch.float16 or device.type not in ("cuda", "cpu"):
        return None
    try:
        return torch.amp.GradScaler(device.type)
    except (AttributeError, RuntimeError, TypeError):  # older torch: CUDA only
        return torch.amp.GradScaler("cuda") if device.type == "cuda" else None


def denormals_flushed() -> bool:
    """Whether the CPU currently flushes subnormal floats to zero (torch has no getter)."""
    return bool((torch.full((1,), 1e-39) * 2).item() == 0.0)


@contextlib.contextmanager
def flush_denormal(enabled: bool = True) -> Iterator[None]:
    """Flush subnormal floats to zero inside the block, then restore the previous setting.

    Subnormal (denormal) floats, common in fine-tuned weights, moments and activations, take a
    slow path on x86 CPUs; flushing them (``torch.set_flush_denormal``) changes values below
    1.2e-38 only.
    """
    if not enabled:
        yield
        return
    before = denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its training flag, also on errors."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class Runtime:
    """How the loop runs tensors: the device, the autocast dtype and the memory format.

    Attributes:
        device: where the model and batches live.
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``), ``None`` for float32.
        channels_last: 4-D inputs are converted to ``torch.channels_last`` (faster convolutions).
        flush_denormals: flush subnormal floats on the CPU inside `cpu_flags`.
        compile: run forward passes through ``torch.compile`` (`forward`).
    """

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    flush_denormals: bool = True
    compile: bool = False
    compiled: tuple[nn.Module, nn.Module] | None = field(default=None, repr=False)  # (model, its compiled wrapper)

    def forward(self, model: nn.Module) -> nn.Module:
        """``model``, or its ``torch.compile`` wrapper (same parameters, compiled once) with `compile`."""
        if not self.compile:
            return model
        if self.compiled is None or self.compiled[0] is not model:
            self.compiled = (model, torch.compile(model))
        return self.compiled[1]

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for `amp_dtype`, or a no-op context for float32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on `device` (non-blocking), channels-last if 4-D and `channels_last` is set."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def cpu_flags(self) -> contextlib.AbstractContextManager:
        """The CPU floating-point settings for a fit/evaluate/predict call (denormal flushing)."""
        return flush_denormal(self.flush_denormals and self.device.type == "cpu")


def setup_runtime(model: nn.Module, config: TrainConfig) -> tuple[DistributedContext | None, Runtime, nn.Module]:
    """Join the process group (under torchrun), pick device, precision and memory format, move ``model``.

    Returns:
        ``(dist, runtime, model)``: the process's place in the group (``None`` alone), the
        `Runtime`, and the model on the device (channels-last when chosen).
    """
    # Under torchrun, join the process group before picking the device (cuda:LOCAL_RANK).
    dist = init_distributed(config.device) if config.distributed == "auto" else None
    device = resolve_device(config.device)
    if dist is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    channels_last = config.channels_last if config.channels_last is not None else has_conv
    runtime = Runtime(device, resolve_precision(config.precision, device), channels_last, config.flush_denormal,
                      config.compile)
    model = model.to(device)
    return dist, runtime, model.to(memory_format=torch.channels_last) if channels_last else model
