"""Reading a checkpoint back into the parts a `FineTuner` is built from (see `FineTuner.load`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tlkit._header import parse_header, runtime_train_config
from tlkit._meta_check import check_header_fits_weights
from tlkit.checkpoint import CheckpointError
from tlkit.config import AugmentConfig, BackboneConfig, HeadConfig, TrainConfig
from tlkit.freeze import FreezePolicy

__all__ = ["StoredRun", "read_header", "choose_classes"]


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
