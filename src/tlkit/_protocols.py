"""`Run`: what the code below the façade may use of a training run, as a typing protocol.

`tlkit.FineTuner` is the one class that satisfies it. Callbacks, loggers, the report and the
training core type against `Run` instead of naming the façade, so no module below it imports
(or, for type checkers, mentions) the façade module: the import graph stays a tree with the
façade on top. A leaf module: it imports nothing from tlkit at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tlkit._runtime import Runtime
    from tlkit.config import AugmentConfig, BackboneConfig, HeadConfig, TrainConfig
    from tlkit.distributed import DistributedContext
    from tlkit.freeze import FreezePolicy

__all__ = ["Run"]


class Run(Protocol):
    """A training run as callbacks and the training core see it (`tlkit.FineTuner` implements it).

    Read-only services: ``model``, ``classes``, ``config``, ``policy``, ``backbone``, ``head``,
    ``augment``, ``data_config``, ``runtime``, ``device``, ``dist``, ``is_main``, ``output_dir``,
    the transforms. Counters the loop owns (`tlkit._training.state.TrainState`): ``epoch``,
    ``step``, ``best``, ``history``, ``should_stop`` (a callback may set it to end training).
    """

    model: nn.Module
    classes: list[str]
    config: TrainConfig
    policy: FreezePolicy
    backbone: BackboneConfig
    head: HeadConfig
    augment: AugmentConfig
    data_config: dict[str, Any]
    runtime: Runtime
    dist: DistributedContext | None
    is_main: bool
    output_dir: Path | None
    epoch: int
    step: int
    steps_per_epoch: int
    best: dict[str, Any]
    history: list[dict[str, Any]]
    should_stop: bool
    checkpoint_metadata: dict[str, Any] | None

    @property
    def device(self) -> torch.device: ...

    @property
    def multilabel(self) -> bool: ...

    def metadata(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def predict(self, inputs: Any, batch_size: int | None = None, **kwargs: Any) -> list[Any]: ...
