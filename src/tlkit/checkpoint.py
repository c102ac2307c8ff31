"""Checkpoints: safetensors weights with JSON metadata, training state, atomic writes.

A checkpoint file (``*.safetensors``) holds the model's ``state_dict`` and, in the safetensors
header, a JSON document (key ``"tlkit"``) with everything needed to rebuild the model without
any other file: backbone name and timm kwargs, head config, class names in index order, data
config, FreezePolicy, metrics and the tlkit version. Training state for resume (optimizer,
scheduler step, epoch, RNG states) lives beside it in ``*.state.pt``, read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "save_training_state",
    "load_training_state",
    "resolve_checkpoint",
    "atomic_write_bytes",
]

FORMAT = "tlkit.checkpoint.v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted or not a tlkit checkpoint."""


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, rename.

    A crash leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write weights and metadata to one ``.safetensors`` file, atomically.

    Args:
        path: destination file.
        state_dict: tensors (moved to CPU and made contiguous here).
        metadata: JSON-serialisable dict stored in the header.
    """
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    header = {"format": FORMAT, "tlkit": json.dumps(metadata)}
    return atomic_write_bytes(path, save(tensors, metadata=header))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`.

    Returns:
        ``(state_dict, metadata)``, tensors on the CPU.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted or has no tlkit metadata.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({type(e).__name__}: {e})") from e
    if header.get("format") != FORMAT or "tlkit" not in header:
        raise CheckpointError(f"{path}: not a tlkit checkpoint (no '{FORMAT}' metadata)")
    try:
        meta = json.loads(header["tlkit"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupted metadata ({e})") from e
    return state, meta


def save_training_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write the resume state (tensors, numbers, strings, lists, dicts only) atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a resume state with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: missing, truncated or corrupted.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: truncated or corrupted training state ({type(e).__name__}: {e})") from e


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's ``best.safetensors`` (else ``last.safetensors``).

    Raises:
        CheckpointError: nothing usable at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: run folder holds no best.safetensors or last.safetensors")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path
