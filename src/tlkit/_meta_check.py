"""Check, before any memory is allocated, that a header describes the weights in the file.

A header chooses the architecture and its kwargs; the file holds the tensors. Building the
model the header describes on PyTorch's ``meta`` device costs no memory, and comparing its
``state_dict`` with the file's tensors (names and shapes) means the real model tlkit then
allocates is no larger than the weights the user already has on disk. A header that asks for a
model wider than its weights (``embed_dim=100000``, a hidden head layer of a billion units) is
refused here, not after a 2.4 GB allocation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tlkit._header import CheckpointHeader
from tlkit._training.state import check_tensors_match
from tlkit.backbone import create_backbone
from tlkit.checkpoint import CheckpointError
from tlkit.head import HeadReplacer

__all__ = ["check_header_fits_weights"]


def _one_line(e: Exception, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())  # timm's messages may span lines
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _build_on_meta(header: CheckpointHeader, path: Path) -> nn.Module:
    """The model the header describes (backbone + stored head), every tensor on ``meta``."""
    config = header.backbone.to_config()
    try:
        with torch.device("meta"):
            model = create_backbone(config)
            HeadReplacer.from_config(header.head).apply(model)
    except Exception as e:  # noqa: BLE001 - whatever timm raises, the file is what is wrong
        raise CheckpointError(
            f"{path}: header field backbone does not build: timm.create_model({config.name!r}, "
            f"**{config.model_kwargs!r}) failed ({_one_line(e)})"
        ) from e
    return model


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
