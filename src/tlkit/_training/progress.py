"""`TrainState`: what the fit loop changes as it trains, owned by the loop (Lightning's loop progress).

The façade exposes each field as a read-write attribute (`FineTuner.step`, ``.epoch``, ``.best``...)
so user code and callbacks keep working, but they live here, in one object the loop writes and
`state_dict` / `load_state_dict` capture. The optimizer, loss scaler and EMA keep their own
``state_dict`` (the resume state writes them beside this one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainState", "StateField", "StateViews"]


@dataclass
class TrainState:
    """Counters, the best epoch, the history and the training-time objects of one run.

    Attributes:
        epoch: completed epochs.
        step: optimizer steps taken.
        steps_per_epoch: optimizer steps in one epoch.
        best: ``{"metric": value, "epoch": number}`` of the best validated epoch.
        history: one record per completed epoch.
        should_stop: a callback sets it to end training after the current epoch.
        optimizer, scaler, ema: the optimizer, the float16 loss scaler, timm's EMA (or ``None``).
        wise_anchor, wise_twin: WiSE-FT's anchor weights and the module holding the interpolation.
        calibration: ``{"temperature", "reject_threshold"}`` fitted on the validation split.
        thresholds: a multi-label model's per-label thresholds.
    """

    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"metric": None, "epoch": None})
    history: list[dict[str, Any]] = field(default_factory=list)
    should_stop: bool = False
    optimizer: Any = None
    scaler: Any = None
    ema: Any = None
    wise_anchor: dict[str, Any] | None = None
    wise_twin: Any = None
    calibration: dict[str, float] | None = None
    thresholds: list[float] | None = None

    def reset(self) -> None:
        """Back to the start of a run (a new `FineTuner.fit`): counters, best, history, stop flag."""
        self.epoch = self.step = 0
        self.best, self.history, self.should_stop = {"metric": None, "epoch": None}, [], False
        self.ema = self.wise_anchor = self.wise_twin = None

    def state_dict(self) -> dict[str, Any]:
        """The plain-data fields (JSON-ready): counters, best, history, calibration, thresholds."""
        return {"epoch": self.epoch, "step": self.step, "best": dict(self.best), "history": list(self.history),
                "calibration": self.calibration, "thresholds": self.thresholds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (missing keys keep their value)."""
        for key in ("epoch", "step", "best", "history", "calibration", "thresholds"):
            if key in state:
                setattr(self, key, state[key])


class StateField:
    """A façade attribute that reads and writes one field of its object's ``state`` (a `TrainState`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj.state, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.state, self.name, value)


class StateViews:
    """The `TrainState` fields as attributes of an object holding it as ``state`` (the façade's base).

    ``tuner.epoch`` reads ``tuner.state.epoch`` and ``tuner.epoch = 3`` writes it: one owner (the
    state, which the loop writes), the names users and callbacks know.
    """

    state: TrainState
    epoch = StateField()
    step = StateField()
    steps_per_epoch = StateField()
    best = StateField()
    history = StateField()
    should_stop = StateField()
    optimizer = StateField()
    scaler = StateField()
    ema = StateField()
    wise_anchor = StateField()
    wise_twin = StateField()
    calibration = StateField()
    thresholds = StateField()
