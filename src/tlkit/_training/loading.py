"""Reading a checkpoint back into the parts a `FineTuner` is built from (see `FineTuner.load`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def read_header(meta: dict[str, Any], path: Path, device: str, overrides: dict[str, Any]) -> StoredRun:
    """Validate a checkpoint header into configs; ``device`` and ``overrides`` replace stored train settings.

    Raises:
        CheckpointError: a field is missing or invalid (names the file).
    """
    try:
        return StoredRun(
            backbone=BackboneConfig(name=meta["backbone"]["name"], pretrained=False,
                                    model_kwargs=meta["backbone"]["model_kwargs"]),
            head=HeadConfig(**meta["head"]),
            classes=list(meta["classes"]),
            train=TrainConfig(**{**meta["train_config"], "device": device, **overrides}),
            policy=FreezePolicy(**meta["freeze_policy"]),
            augment=AugmentConfig(**meta["augment"]),
            data_config=meta["data_config"],
            epoch=int(meta.get("epoch", 0)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: incomplete or invalid metadata ({type(e).__name__}: {e})") from e


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
