"""Check, before any memory is allocated, that a header describes the weights in the file.

A header chooses the architecture and its kwargs; the file holds the tensors. Building the
model the header describes on PyTorch's ``meta`` device costs no memory, and comparing its
``state_dict`` with the file's tensors (names and shapes) means the real model tlkit then
allocates is no larger than the weights the user already has on disk. A header that asks for a
model wider than its weights (``embed_dim=100000``, a hidden head layer of a billion units) is
refused here, before any allocation.

Some timm ``__init__`` code computes its layout with tensor ops the meta device lacks (before
timm 1.0.30, RegNets call ``torch.unique`` and CSATv2 builds a DCT kernel). For those the build
is retried in `WeightsOnMeta`: tensors made by size (``empty``, ``zeros``, ``randn``...) with
more than 4096 elements, so every weight that matters for memory, go to the meta device;
tensors made from values (``arange``, ``linspace``, ``tensor``) and small ones stay real, so the
layout can be computed. (timm 1.0.26's RegNet-Y 2560 keeps 0.2 M of its 1.28 G elements real.)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from tlkit._header import CheckpointHeader
from tlkit._meta import MetaValuesSkipped
from tlkit.backbone import create_backbone
from tlkit.checkpoint import CheckpointError, check_tensors_match
from tlkit.head import HeadReplacer

__all__ = ["MetaValuesSkipped", "WeightsOnMeta", "build_on_meta", "check_header_fits_weights"]

# Factory functions whose tensor size is given by their arguments: weights, buffers, masks.
_SIZED = {torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
          torch.randint, torch.eye}
_SMALL = 4096  # elements; smaller sized tensors stay real (layout tables such as a DCT kernel)


def _requested_numel(func, args: tuple, kwargs: dict) -> int:
    """Elements a `_SIZED` call asks for; any argument form it cannot read counts as large."""
    try:
        if func is torch.eye:
            n = int(args[0] if args else kwargs["n"])
            m = args[1] if len(args) > 1 else kwargs.get("m")
            return n * int(n if m is None else m)
        if func is torch.randint:
            size = kwargs.get("size") or next(a for a in args if isinstance(a, (tuple, list, torch.Size)))
        elif func in (torch.full, torch.empty_strided) or (len(args) == 1 and not isinstance(args[0], int)):
            size = args[0] if args else kwargs["size"]
        else:
            size = args or kwargs["size"]
        return math.prod(int(d) for d in size)
    except (KeyError, IndexError, StopIteration, TypeError, ValueError):
        return _SMALL + 1


class WeightsOnMeta(TorchFunctionMode):
    """Within this mode, sized factory calls (`_SIZED`) for more than `_SMALL` elements make meta
    tensors; value ones (``arange``, ``tensor``...) and small sized ones stay real.

    Torch function modes are per thread, so other threads keep building real tensors.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _SIZED and kwargs.get("device") is None and _requested_numel(func, args, kwargs) > _SMALL:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


# Tried in order: the plain meta device first, the mixed mode for layouts computed with tensors.
_MODES = (lambda: torch.device("meta"), WeightsOnMeta)


def _one_line(e: Exception, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())  # timm's messages may span lines
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_on_meta(build) -> nn.Module:
    """``build()`` with its weights on the ``meta`` device (plain meta first, then `WeightsOnMeta`).

    Raises:
        Exception: what the last, most permissive, attempt raised.
    """
    error: Exception | None = None
    for mode in _MODES:
        try:
            with mode(), MetaValuesSkipped():
                return build()
        except Exception as e:  # noqa: BLE001 - whatever timm raises, the caller names the file
            error = e  # the last mode is the most permissive: its error is the one that matters
    raise error


def _build_on_meta(header: CheckpointHeader, path: Path) -> nn.Module:
    """The model the header describes (backbone + stored head), its weights on ``meta``."""
    config = header.backbone.to_config()

    def build() -> nn.Module:
        model = create_backbone(config)
        HeadReplacer.from_config(header.head).apply(model)
        header.freeze_policy.prepare(model)  # LoRA adapters are tensors of the file too
        return model

    try:
        return build_on_meta(build)
    except Exception as error:  # noqa: BLE001 - whatever timm raises, the file is what is wrong
        raise CheckpointError(
            f"{path}: header field backbone does not build: timm.create_model({config.name!r}, "
            f"**{config.model_kwargs!r}) failed ({_one_line(error)})"
        ) from error


def check_header_fits_weights(header: CheckpointHeader, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse a header whose model does not have exactly the file's tensors.

    Args:
        header: the validated header (`tlkit._header.parse_header`).
        state: the file's tensors, name -> tensor of any shape.
        path: the checkpoint file, for messages.

    Raises:
        CheckpointError: a tensor is missing, unexpected or of another shape (names the first
            ones, in model order, and the file); or the model's non-persistent buffers (not in
            any file) would hold more elements than the file's tensors together.
    """
    path = Path(path)
    model = _build_on_meta(header, path)
    own = model.state_dict()
    check_tensors_match(own, state, path)
    # Buffers registered with persistent=False (attention masks, position tables) are built
    # from the kwargs, not read from the file: bound them by the file too.
    extra = sum(b.numel() for name, b in model.named_buffers() if name not in own)
    stored = sum(t.numel() for t in state.values())
    if extra > stored:
        raise CheckpointError(
            f"{path}: header field backbone.model_kwargs makes the model build {extra} buffer elements "
            f"that are not in the file, more than the file's {stored} weights"
        )
