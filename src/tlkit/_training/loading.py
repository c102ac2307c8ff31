"""Building a `FineTuner` from a `RunConfig`, a checkpoint, or a plain timm folder (its three constructors)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from tlkit._header import parse_header, runtime_train_config
from tlkit._introspect import classifier_module_names
from tlkit._meta_check import check_header_fits_weights
from tlkit._rng import seeded
from tlkit._training import state as run_state
from tlkit.backbone import create_backbone, resolve_backbone, resolve_data_config
from tlkit.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from tlkit.config import AugmentConfig, BackboneConfig, HeadConfig, RunConfig, TrainConfig
from tlkit.freeze import FreezePolicy
from tlkit.head import HeadReplacer

T = TypeVar("T")

__all__ = ["StoredRun", "read_header", "choose_classes", "load_run", "build_run", "load_timm_folder"]


@dataclass
class StoredRun:
    """The validated configs of a checkpoint header."""

    backbone: BackboneConfig
    head: HeadConfig
    classes: list[str]
    train: TrainConfig
    policy: FreezePolicy
    augment: AugmentConfig
    data_config: dict[str, Any]
    epoch: int
    calibration: dict[str, float] | None = None
    thresholds: list[float] | None = None


def read_header(meta: dict[str, Any], path: Path, device: str, overrides: dict[str, Any],
                state: dict[str, torch.Tensor]) -> StoredRun:
    """Validate a checkpoint header into configs, and check it describes exactly the file's tensors.

    The file may come from a stranger: nothing is built from the header before it passed the
    schema (`tlkit._header.parse_header`) and before the model it describes, built on the
    ``meta`` device, was checked against the file's tensors. Resource settings come from
    ``device`` and ``overrides`` (or their defaults), never from the file.

    Raises:
        CheckpointError: a field is missing, invalid or not allowed (names the file and the field),
            or the described model does not have the file's tensors.
    """
    header = parse_header(meta, path)
    check_header_fits_weights(header, state, path)
    return StoredRun(
        backbone=header.backbone.to_config(),
        head=header.head,
        classes=list(header.classes),
        train=runtime_train_config(header.train_config, device=device, **overrides),
        policy=header.freeze_policy,
        augment=header.augment,
        data_config=header.data_config_dict(),
        epoch=header.epoch,
        calibration=header.calibration.model_dump() if header.calibration is not None else None,
        thresholds=list(header.thresholds) if header.thresholds is not None else None,
    )


def choose_classes(stored: list[str], classes: Sequence[str] | None, num_classes: int | None,
                   adapt_head: bool, path: Path) -> list[str]:
    """The classes a loaded model predicts: the stored ones, or those asked for with ``adapt_head``.

    Raises:
        ValueError: ``classes`` and ``num_classes`` disagree.
        CheckpointError: other classes without ``adapt_head=True``.
    """
    if classes is not None:
        wanted = list(classes)
        if num_classes is not None and num_classes != len(wanted):
            raise ValueError(f"num_classes={num_classes} but {len(wanted)} classes were given: {wanted}")
    elif num_classes is not None:
        wanted = stored if num_classes == len(stored) else [str(i) for i in range(num_classes)]
    else:
        wanted = stored
    if wanted != stored and not adapt_head:
        raise CheckpointError(
            f"{path}: the checkpoint's head predicts {len(stored)} classes {stored}, not the {len(wanted)} "
            f"asked for {wanted}; pass adapt_head=True to load the backbone and initialise a new head"
        )
    return wanted


def load_run(cls: type[T], path: str | Path, device: str, classes: Sequence[str] | None, num_classes: int | None,
             adapt_head: bool, overrides: dict[str, Any]) -> T:
    """A ready ``cls`` (`tlkit.FineTuner`) from a checkpoint file or run folder: see `FineTuner.load`."""
    path = resolve_checkpoint(path)
    state, meta = load_checkpoint(path)
    run = read_header(meta, path, device, overrides, state)
    wanted = choose_classes(run.classes, classes, num_classes, adapt_head, path)
    new_head = wanted != run.classes
    head = run.head.model_copy(update={"num_classes": len(wanted)}) if new_head else run.head
    with seeded(run.train.seed)():  # a new head is initialised the same way on every load
        model = create_backbone(run.backbone)
        HeadReplacer.from_config(head, seed=run.train.seed).apply(model)
    tuner: Any = cls(model, wanted, policy=run.policy, config=run.train, data_config=run.data_config,
                     augment=run.augment, backbone=run.backbone, head=head)
    skip = tuple(f"{n}." for n in classifier_module_names(tuner.model)) if new_head else ()
    run_state.load_weights_checked(tuner.model, state, path, skip)
    tuner.epoch = 0 if new_head else run.epoch
    tuner.calibration = None if new_head else run.calibration
    tuner.thresholds = None if new_head else run.thresholds
    tuner.checkpoint_metadata = meta
    tuner.model.eval()
    return tuner


def build_run(cls: type[T], config: RunConfig, classes: Sequence[str], callbacks: Sequence[Any] | None) -> T:
    """A ``cls`` for ``config``, new weights seeded by ``config.train.seed``: see `FineTuner.from_config`."""
    config = config.with_run_dir()  # output_dir None: a new folder per run
    backbone = resolve_backbone(config.backbone)
    head = config.head.model_copy(update={"num_classes": config.head.num_classes or len(classes)})
    with seeded(config.train.seed)():
        model = create_backbone(backbone)
        HeadReplacer.from_config(head, seed=config.train.seed).apply(model)
    return cls(model, classes, policy=config.freeze, config=config.train,  # type: ignore[call-arg]
               data_config=resolve_data_config(model, backbone.data_config), augment=config.data.augment,
               output_dir=config.output_dir, backbone=backbone, head=head, callbacks=callbacks)


def load_timm_folder(cls: type[T], path: str | Path, device: str, overrides: dict[str, Any]) -> T:
    """A ready ``cls`` from a plain timm folder: see `FineTuner.from_pretrained`."""
    from tlkit.hub import load_pretrained

    model, classes, kwargs, data = load_pretrained(path)
    backbone = BackboneConfig(name=model.pretrained_cfg.get("architecture", type(model).__name__),
                              pretrained=False, model_kwargs=kwargs, data_config=data)
    return cls(model, classes, config=TrainConfig(**{"device": device, **overrides}),  # type: ignore[call-arg]
               backbone=backbone, data_config=resolve_data_config(model, backbone.data_config))
