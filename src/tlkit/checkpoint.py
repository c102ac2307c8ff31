"""Checkpoints: safetensors weights with JSON metadata, training state, atomic writes.

A checkpoint file (``*.safetensors``) holds the model's ``state_dict`` and, in the safetensors
header, a JSON document (key ``"tlkit"``) with everything needed to rebuild the model without
any other file: backbone name and timm kwargs, head config, class names in index order, data
config, FreezePolicy, metrics and the tlkit version. Training state for resume (weights,
optimizer, scheduler step, epoch, RNG states) lives beside it in ``*.state.pt``, read back with
``torch.load(weights_only=True)``.

Both kinds of file carry a sha256 of their content (neither safetensors nor ``torch.load``
checks one), so a flipped byte is an error naming the file, never silently wrong weights.
Format ``tlkit.checkpoint.v2`` adds a ``digest`` over the metadata *and* the tensors, so a
changed class name, class order or mean is an error too. Format v1 files (tensor sha256 only,
header not covered) still load. A digest is not a signature: whoever edits a file on purpose
can recompute it. What defends against a hostile file is `tlkit._header`, the schema every
header must pass before anything is built from it.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from tlkit._fs import atomic_write_bytes  # re-exported: the run folder's one writer

__all__ = [
    "check_tensors_match",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "save_training_state",
    "load_training_state",
    "resolve_checkpoint",
    "atomic_write_bytes",
    "tensors_sha256",
    "header_digest",
]

FORMAT = "tlkit.checkpoint.v2"
FORMAT_V1 = "tlkit.checkpoint.v1"  # tensor sha256 only; the header is not covered


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted or not a tlkit checkpoint."""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 (hex) of names, dtypes, shapes and raw bytes of ``tensors``, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def canonical_json(metadata: Any) -> bytes:
    """The metadata as canonical JSON (sorted keys, no spaces, UTF-8): equal dicts, equal bytes."""
    # allow_nan: a NaN val_loss is a legitimate metric; json writes and reads it as NaN.
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode()


def header_digest(metadata: Any, tensor_sha256: str) -> str:
    """sha256 (hex) over the format name, the canonical metadata JSON and the tensor sha256.

    One digest for the whole file: editing any header value or any tensor byte changes it.
    """
    h = hashlib.sha256(f"{FORMAT}\n".encode())
    h.update(canonical_json(metadata))
    h.update(f"\n{tensor_sha256}".encode())
    return h.hexdigest()


MAX_STATE_DEPTH = 32
"""Nesting a resume state may have (tlkit writes about 6 levels)."""
MAX_STATE_NODES = 2_000_000
"""Values a resume state may hold (lists, dicts and leaves; every tensor counts as one)."""


class _Tree:
    """Walks a loaded resume state once: bounded depth and size, no cycles, shared parts hashed once.

    A hostile state can share one list many times (``l = [l, l]`` 64 deep is 2**64 paths in a
    1.8 KB file) or contain itself; walking it as a tree would never end. Each container is
    visited once; a second reference to it is hashed as a back-reference, so a state tlkit wrote
    (which shares nothing) hashes exactly as before.
    """

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.seen: dict[int, int] = {}  # id(container) -> its visit number
        self.open: set[int] = set()
        self.nodes = 0

    def walk(self, obj: Any, depth: int = 0) -> None:
        self.nodes += 1
        if depth > MAX_STATE_DEPTH or self.nodes > MAX_STATE_NODES:
            raise ValueError(f"nested deeper than {MAX_STATE_DEPTH} levels or holding more than {MAX_STATE_NODES} values")
        if isinstance(obj, torch.Tensor):
            self.h.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
            self.h.update(_tensor_bytes(obj))
            return
        if not isinstance(obj, (dict, list, tuple)):
            self.h.update(f"V{obj!r};".encode())
            return
        key = id(obj)
        if key in self.open:
            raise ValueError("holds a list or dict that contains itself")
        if key in self.seen:
            self.h.update(f"R{self.seen[key]};".encode())
            return
        self.seen[key] = len(self.seen)
        self.open.add(key)
        if isinstance(obj, dict):
            self.h.update(f"D{len(obj)}".encode())
            for k in sorted(obj, key=repr):
                self.h.update(f"K{k!r}".encode())
                self.walk(obj[k], depth + 1)
        else:  # torch.load may not keep the list/tuple distinction
            self.h.update(f"L{len(obj)}".encode())
            for v in obj:
                self.walk(v, depth + 1)
        self.open.discard(key)


def _tree_sha256(obj: Any) -> str:
    """sha256 of a nested structure of tensors, numbers, strings, lists, tuples and dicts (see `_Tree`).

    Raises:
        ValueError: deeper than `MAX_STATE_DEPTH`, more than `MAX_STATE_NODES` values, or a cycle.
    """
    tree = _Tree()
    tree.walk(obj)
    return tree.h.hexdigest()


def _check_state_archive(path: Path) -> None:
    """A resume state is a torch zip archive whose records are stored, not compressed.

    ``torch.save`` never compresses; a compressed record (1 MB inflating to 1.5 GB) is refused
    before ``torch.load`` inflates it, so reading a state needs no more memory than its file size.

    Raises:
        CheckpointError: not a zip archive, or a compressed record (names it).
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            packed = next((i for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED), None)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupted training state (not a torch archive: {e})") from None
    if packed is not None:
        raise CheckpointError(f"{path}: training state record {packed.filename!r} is compressed "
                              f"({packed.file_size} bytes inflated); torch.save never writes one, so it is not read")


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write weights and metadata to one ``.safetensors`` file, atomically.

    Args:
        path: destination file.
        state_dict: tensors (moved to CPU and made contiguous here).
        metadata: JSON-serialisable dict stored in the header, next to a ``sha256`` of the
            tensors (`tensors_sha256`) and a ``digest`` of metadata and tensors together
            (`header_digest`), both verified by `load_checkpoint`.
    """
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    sha = tensors_sha256(tensors)
    # The digest is taken over the metadata as it will be read back, so a value JSON cannot
    # represent exactly (a tuple, a numpy float) does not make a fresh file fail its own check.
    text = json.dumps(metadata)
    digest = header_digest(json.loads(text), sha)
    header = {"format": FORMAT, "tlkit": text, "sha256": sha, "digest": digest}
    return atomic_write_bytes(path, save(tensors, metadata=header))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`.

    Only integrity is checked here; `FineTuner.load` also validates the metadata against the
    header schema before it builds anything from it.

    Returns:
        ``(state_dict, metadata)``, tensors on the CPU.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted (tensor bytes that no longer
            match the stored sha256; in format v2 also metadata that no longer matches the
            digest) or has no tlkit metadata; names the file.
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
    if header.get("format") not in (FORMAT, FORMAT_V1) or "tlkit" not in header:
        raise CheckpointError(f"{path}: not a tlkit checkpoint (no '{FORMAT}' or '{FORMAT_V1}' metadata)")
    if header["format"] == FORMAT and not {"sha256", "digest"} <= set(header):
        raise CheckpointError(f"{path}: corrupted checkpoint ({FORMAT} header without its sha256 and digest)")
    # A format v1 header (tlkit 0.1.0) holds exactly these keys: a v2 file relabelled v1 (its digest
    # kept, renamed or dropped to switch the check off) is refused; a digest present is always checked.
    if header["format"] == FORMAT_V1 and not set(header) <= {"format", "tlkit", "sha256"}:
        raise CheckpointError(f"{path}: corrupted or edited checkpoint ({FORMAT_V1} header with other keys "
                              f"{sorted(set(header) - {'format', 'tlkit', 'sha256'})[:3]})")
    sha = tensors_sha256(state)
    if "sha256" in header and sha != header["sha256"]:  # absent in v1 files from tlkit 0.1.0
        raise CheckpointError(f"{path}: corrupted checkpoint (tensor data does not match its sha256)")
    try:
        meta = json.loads(header["tlkit"])
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; RecursionError: [[[[...
        raise CheckpointError(f"{path}: corrupted metadata ({type(e).__name__}: {e})") from e
    if "digest" in header and header_digest(meta, sha) != header["digest"]:
        raise CheckpointError(
            f"{path}: corrupted or edited checkpoint header (the metadata does not match its digest)"
        )
    return state, meta


def save_training_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write the resume state (tensors, numbers, strings, lists, dicts only) atomically.

    A ``"sha256"`` entry over the whole state is added, verified by `load_training_state`.
    """
    buf = io.BytesIO()
    torch.save({**state, "sha256": _tree_sha256(state)}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a resume state with ``torch.load(weights_only=True)``.

    Returns:
        The dict given to `save_training_state`.

    The file may come from someone else: its records must be stored, not compressed (memory
    bounded by the file size), and the structure read must be at most `MAX_STATE_DEPTH` deep,
    hold at most `MAX_STATE_NODES` values and no cycle; each shared part is hashed once, so
    reading takes time linear in the file.

    Raises:
        CheckpointError: missing, truncated, corrupted, compressed, cyclic or too deep or large
            (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state not found: {path}")
    _check_state_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # RecursionError included: a nesting torch's unpickler cannot follow
        raise CheckpointError(f"{path}: truncated or corrupted training state ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a tlkit training state (holds {type(state).__name__})")
    digest = state.pop("sha256", None)
    try:
        actual = _tree_sha256(state)  # walked even without a digest: it bounds the structure
    except ValueError as e:
        raise CheckpointError(f"{path}: not a tlkit training state: it is {e}") from None
    if digest is not None and actual != digest:  # absent in files from earlier tlkit versions
        raise CheckpointError(f"{path}: corrupted training state (content does not match its sha256)")
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's ``best.safetensors`` (else ``last.safetensors``).

    A run folder may come from someone else: its ``best.safetensors`` / ``last.safetensors``
    must be a regular file inside the folder. A symbolic link that leads out of the folder
    (to ``~/.ssh/id_rsa``, ``/dev/zero``, a FIFO) is refused, not opened. A file named directly
    is the caller's choice and is followed wherever it points.

    Raises:
        CheckpointError: nothing usable at ``path``, or a run-folder checkpoint that resolves
            outside the folder (names it).
    """
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            candidate = path / name
            if candidate.is_symlink() and not candidate.resolve().is_relative_to(path.resolve()):
                raise CheckpointError(f"{candidate}: is a symbolic link out of the run folder; not opened")
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: run folder holds no best.safetensors or last.safetensors")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def check_tensors_match(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse ``state`` unless it has exactly the names and shapes of ``own`` (a model's state_dict).

    Raises:
        CheckpointError: names the first missing, unexpected and reshaped tensors and the file.
    """
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path}: does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatches (file vs model) {shapes[:3]}"
        )
