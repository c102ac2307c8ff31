"""What a run writes and what resume restores: the resume state, checkpoints, ``metrics.jsonl``.

The crash-safe order of one epoch's files: ``last.state.pt`` (the resume state, weights
included, one atomic file) first, then ``last.safetensors``, ``best.safetensors`` when the epoch
improved, and ``metrics.jsonl``. A kill between any two writes leaves a consistent snapshot,
because resume rewrites the files written after the state from the state itself.

Epochs are counted, never indexed, in everything written here: ``epoch`` is the number of
completed epochs (1 after the first), in the state, every checkpoint header, ``metrics.jsonl``
records and ``best``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tlkit._header import unloadable_reason
from tlkit._runfiles import run_file_writes
from tlkit._training.averaging import shipped_module
from tlkit._version import __version__
from tlkit.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    check_tensors_match,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from tlkit.runlock import RUN_FILES

if TYPE_CHECKING:
    from tlkit._protocols import Run

__all__ = ["weights_fingerprint", "checkpoint_header", "assert_finite", "write_epoch",
           "write_run_files", "state_path_for", "restore"]

NUMBERING = "completed-epochs"  # marks states whose epochs are counts (tlkit > 0.1.0)


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap fingerprint of the weights (sum and sum of squares per tensor, 12 digits).

    Checks that the weights loaded on resume are those the state was written with; a full
    sha256 (`tlkit.checkpoint.tensors_sha256`) already guards each file's bytes.
    """
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        v = v.detach().double()
        h.update(f"{k}:{v.sum().item():.12e}:{(v * v).sum().item():.12e};".encode())
    return h.hexdigest()[:16]


def checkpoint_header(tuner: Run, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON stored in every checkpoint's header (see `tlkit.checkpoint`).

    Warns (``UserWarning``) when `FineTuner.load` would refuse it, e.g. ``model_kwargs`` outside
    the allow-list a checkpoint may carry (`tlkit._header.MODEL_KWARGS`).
    """
    b = tuner.backbone
    source = f"file:{Path(b.weights).name}" if b.weights is not None else ("hub" if b.pretrained else "random")
    meta = {
        "tlkit_version": __version__,
        "backbone": {"name": b.name, "model_kwargs": b.model_kwargs, "weights_source": source},
        "head": tuner.head.model_dump(mode="json"),
        "classes": tuner.classes,
        "data_config": tuner.data_config,
        "freeze_policy": tuner.policy.model_dump(mode="json"),
        "train_config": tuner.config.model_dump(mode="json"),
        "augment": tuner.augment.model_dump(mode="json"),
        "epoch": tuner.epoch,
        "metrics": metrics or {},
    }
    if getattr(tuner, "calibration", None):  # fitted on this epoch's validation outputs (tlkit.calibration)
        meta["calibration"] = dict(tuner.calibration)
    if getattr(tuner, "thresholds", None):  # multi-label: tuned on this epoch's validation outputs
        meta["thresholds"] = list(tuner.thresholds)
    problem = unloadable_reason(meta)
    if problem is not None:  # say so when the file is written, not when someone needs to load it
        warnings.warn(f"FineTuner.load will refuse this checkpoint: {problem}", stacklevel=3)
    return meta


def assert_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write non-finite weights or statistics: such a file would predict NaN.

    Raises:
        FloatingPointError: names the first non-finite tensor and ``what`` was being written.
    """
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"{what}: tensor {name!r} holds NaN or inf; nothing was written, "
                                     "the files of the last good epoch are kept")


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu") for k, v in state.items()}


def write_epoch(tuner: Run, improved: bool, rng: list[dict[str, Any]],
                callbacks: dict[str, Any]) -> dict[str, Path]:
    """Write the resume state, then the run files; ``rng`` holds every rank's RNG state, rank order.

    Returns:
        ``"state"`` and the names of `write_run_files` -> the paths written.
    """
    with run_file_writes(tuner.output_dir, tuner.epoch):
        return _write_epoch(tuner, improved, rng, callbacks)


def _write_epoch(tuner: Run, improved: bool, rng: list[dict[str, Any]],
                 callbacks: dict[str, Any]) -> dict[str, Path]:
    out = tuner.output_dir
    model = _cpu(tuner.model.state_dict())
    ema = _cpu(tuner.ema.module.state_dict()) if tuner.ema is not None else None
    assert_finite(model, str(out / "last.state.pt"))
    state_path = save_training_state(out / "last.state.pt", {
        "epoch": tuner.epoch, "epoch_numbering": NUMBERING, "step": tuner.step, "model": model,
        "optimizer": tuner.optimizer.state_dict(),
        "scaler": tuner.scaler.state_dict() if tuner.scaler is not None else None,
        "rng": rng[0], "rng_per_rank": rng, "best": tuner.best, "history": json.dumps(tuner.history),
        "weights_digest": weights_fingerprint(tuner.model), "ema": ema, "callbacks": callbacks,
        "classes": list(tuner.classes), "wise_anchor": tuner.wise_anchor,
    })
    return {"state": state_path, **write_run_files(tuner, best=improved)}


def write_run_files(tuner: Run, best: bool) -> dict[str, Path]:
    """``last.safetensors``, ``best.safetensors`` (if ``best``) and ``metrics.jsonl`` from the current state.

    Returns:
        Name (``"last"``, ``"best"``, ``"metrics"``) -> path of each file written.
    """
    out = tuner.output_dir
    record = tuner.history[-1]
    keys = ("epoch", "map", "macro_f1", "micro_f1", "val_loss", "train_loss") if tuner.multilabel else \
        ("epoch", "top1", "macro_f1", "val_loss", "train_loss", "per_class_recall")
    metrics = {k: record.get(k) for k in keys}
    weights = shipped_module(tuner).state_dict()
    assert_finite(weights, str(out / "last.safetensors"))
    meta = checkpoint_header(tuner, metrics)
    written = {"last": save_checkpoint(out / "last.safetensors", weights, meta)}
    if best:
        written["best"] = save_checkpoint(out / "best.safetensors", weights, meta)
    lines = "".join(json.dumps(r) + "\n" for r in tuner.history)
    written["metrics"] = atomic_write_bytes(out / "metrics.jsonl", lines.encode())
    return written


def clean_temp_files(output_dir: Path) -> None:
    """Remove temporary files that a run killed halfway through an atomic write left behind."""
    for name in RUN_FILES:
        for tmp in output_dir.glob(f".{name}.tmp-*"):
            tmp.unlink(missing_ok=True)


def state_path_for(tuner: Run, resume: bool | str | Path) -> Path | None:
    """The resume state to load, or ``None`` when a run folder holds no run files yet (start at 0).

    Raises:
        ValueError: ``resume=True`` without ``output_dir``.
    """
    if resume is not True:
        return Path(resume)
    if tuner.output_dir is None:
        raise ValueError("resume=True needs output_dir; pass the path of a .state.pt file instead")
    if not any((tuner.output_dir / n).exists() for n in RUN_FILES):
        # Killed before the first epoch ended: there is nothing to resume, start over.
        if tuner.is_main:
            print(f"resume: {tuner.output_dir} holds no run files yet; starting at epoch 1", file=sys.stderr)
        return None
    return tuner.output_dir / "last.state.pt"


def load_weights_checked(model: nn.Module, state: dict[str, torch.Tensor], path: Path,
                         skip_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model``, refusing any missing, unexpected or reshaped tensor.

    Args:
        skip_prefixes: names starting with these keep the model's own values (a new head).

    Raises:
        CheckpointError: names the first mismatching tensors, in model order, and the file; or a
            tensor holding NaN or inf (such weights predict NaN for every photo).
    """
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip_prefixes)} if skip_prefixes \
        else model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(skip_prefixes)} if skip_prefixes else state
    check_tensors_match(own, state, path)
    bad = next((k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad!r} holds NaN or inf values (not finite); not loaded")
    model.load_state_dict(state, strict=not skip_prefixes)


def _renumber_old(state: dict[str, Any]) -> None:
    """States of tlkit 0.1.0 index epochs from 0 in ``history`` and ``best``; count them instead."""
    if state.get("epoch_numbering") == NUMBERING:
        return
    history = json.loads(state["history"])
    for r in history:
        r["epoch"] += 1
    state["history"] = json.dumps(history)
    if state["best"].get("epoch") is not None:
        state["best"] = {**state["best"], "epoch": state["best"]["epoch"] + 1}


def _restore_weights(tuner: Run, state: dict[str, Any], state_path: Path) -> None:
    if "model" in state:
        weights_path = state_path
        load_weights_checked(tuner.model, state["model"], state_path)
    else:  # written by tlkit 0.1.0: weights in the .safetensors file beside the state
        weights_path = state_path.with_name(state_path.name.replace(".state.pt", ".safetensors"))
        load_weights_checked(tuner.model, load_checkpoint(weights_path)[0], weights_path)
    if weights_fingerprint(tuner.model) != state["weights_digest"]:
        raise CheckpointError(f"{weights_path}: weights do not match the digest recorded in {state_path} "
                              "(corrupted, or from another epoch)")


def _restore_optimizer(tuner: Run, state: dict[str, Any], state_path: Path, next_epoch: int) -> None:
    from tlkit._training.optim import join_phase

    # Replay the phase boundaries already passed so the optimizer's groups are the ones the
    # uninterrupted run had, in the same order; then restore their state.
    for b in tuner.policy.boundaries():
        if b < next_epoch:
            tuner.policy.apply(tuner.model, b)
            join_phase(tuner.optimizer, tuner.policy, tuner.model, tuner.config, b, step=None)
    try:
        tuner.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{state_path}: optimizer state does not fit this policy ({e})") from e
    if tuner.scaler is not None and state.get("scaler"):
        tuner.scaler.load_state_dict(state["scaler"])
    if tuner.ema is not None:
        if state.get("ema") is None:
            raise CheckpointError(f"{state_path}: holds no EMA weights but config.ema_decay is set")
        try:
            tuner.ema.module.load_state_dict(state["ema"])
        except RuntimeError as e:
            raise CheckpointError(f"{state_path}: EMA weights do not fit this model ({e})") from e


def restore(tuner: Run, state_path: Path, callbacks: Any) -> int:
    """Load a resume state into ``tuner`` (weights, optimizer, scaler, EMA, counters, RNG, callbacks).

    Each rank continues its own RNG stream when the world size is unchanged; otherwise every
    rank takes rank 0's.

    Returns:
        The number of completed epochs, where training continues.

    Raises:
        CheckpointError: the state is missing, corrupted, for other classes, or does not fit.
    """
    from tlkit._rng import set_rng_state

    state = load_training_state(state_path)
    stored = state.get("classes")
    if stored is not None and list(stored) != list(tuner.classes):
        raise CheckpointError(f"{state_path}: the run was trained for classes {list(stored)}, not "
                              f"{list(tuner.classes)}; resume with the same class folders, or start a new run")
    _renumber_old(state)
    _restore_weights(tuner, state, state_path)
    next_epoch = int(state["epoch"])
    _restore_optimizer(tuner, state, state_path, next_epoch)
    tuner.step, tuner.best, tuner.history = int(state["step"]), state["best"], json.loads(state["history"])
    tuner.wise_anchor = state.get("wise_anchor")  # the WiSE-FT anchor, once the run had taken it
    last = tuner.history[-1] if tuner.history else {}
    if "temperature" in last:  # the calibration the last epoch's checkpoint carries
        tuner.calibration = {k: last[k] for k in ("temperature", "reject_threshold")}
    if "thresholds" in last:
        tuner.thresholds = list(last["thresholds"])
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    rank, world = (tuner.dist.rank, tuner.dist.world_size) if tuner.dist else (0, 1)
    set_rng_state(per_rank[rank] if len(per_rank) == world else state["rng"])
    callbacks.load_state_dict(state.get("callbacks") or {})
    tuner.epoch = next_epoch
    if tuner.output_dir is not None and tuner.history and tuner.is_main:
        # A kill may have come after the state but before the files written after it:
        # write them again from the state.
        with run_file_writes(tuner.output_dir, next_epoch):
            write_run_files(tuner, best=tuner.best.get("epoch") == next_epoch)
    return next_epoch
