"""The schema a checkpoint header must pass before tlkit builds anything from it.

A run folder can come from a stranger, and its header decides which ``timm.create_model``
call tlkit makes, how many classes and which names come out, and how images are preprocessed.
`parse_header` therefore accepts only values that are known to be harmless: a timm model
name from timm's own registry, a short allow-list of ``timm.create_model`` keyword arguments
with bounded scalar values (`MODEL_KWARGS`; nothing that names a path or a file, and no
``checkpoint_path``, ``pretrained_cfg``, ``pretrained_cfg_overlay`` or ``cache_dir``), class
names that are unique, short and free of control characters, and a data config with bounded
sizes and positive finite statistics. Every failure is a `CheckpointError` naming the file and
the field.

The header's digest (`tlkit.checkpoint.header_digest`) catches damage and accidental edits;
it cannot stop a deliberate author, who can recompute it. This schema is what bounds what a
deliberate author can do. Resource settings (worker processes, device, batch size for
inference, caches, compilation, process groups) are never taken from a file: see
`runtime_train_config`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from tlkit.checkpoint import CheckpointError
from tlkit.config import MAX_CLASSES, AugmentConfig, BackboneConfig, HeadConfig, TrainConfig
from tlkit.freeze import FreezePolicy

__all__ = ["CheckpointHeader", "MODEL_KWARGS", "RUNTIME_FIELDS", "STORED_FIELDS", "parse_header",
           "runtime_train_config", "unloadable_reason"]

MAX_NAME_LENGTH = 256
MIN_SIDE, MAX_SIDE = 8, 2048
MAX_HIDDEN_DIM = 65_536
MAX_PATTERNS, MAX_PHASES = 1_000, 1_000
MAX_EPOCH = 1_000_000
MAX_METRICS = 1_000

MODEL_KWARGS: dict[str, str] = {
    "pad_type": "'', 'same' or 'valid' (TF-style 'same' padding for ported TF weights)",
    "drop_rate": "float in [0, 1): dropout before the classifier",
    "drop_path_rate": "float in [0, 1): stochastic depth",
    "drop_block_rate": "float in [0, 1): DropBlock (ResNets)",
    "global_pool": "'', 'avg', 'max', 'avgmax', 'catavgmax', 'fast', 'token' or 'map'",
    "img_size": f"int, or [int, int], each in [{MIN_SIDE}, {MAX_SIDE}] (ViT-style models)",
    "dynamic_img_size": "bool (ViT-style models)",
}
"""The ``timm.create_model`` keyword arguments a checkpoint header may set, with their bounds."""

RUNTIME_FIELDS: frozenset[str] = frozenset({
    "device", "num_workers", "eval_batch_size", "compile", "distributed", "sync_batchnorm",
    "find_unused_parameters", "progress", "feature_cache_dir", "loggers",  # loggers write files
})
"""`TrainConfig` fields that say how *this* machine runs, not what the weights are: taken from
the caller (or the defaults), never from a checkpoint."""

STORED_FIELDS: frozenset[str] = frozenset({
    "epochs", "batch_size", "accumulate_steps", "optimizer", "lr", "weight_decay", "momentum", "warmup_epochs", "schedule", "min_lr_ratio",
    "label_smoothing", "grad_clip_norm", "mixup_alpha", "cutmix_alpha", "mixup_prob", "class_weights", "sampler", "ema_decay",
    "unfreeze_warmup_epochs", "wise_ft", "time_budget", "auto", "early_stopping_patience", "best_metric", "seed", "precision", "channels_last",
    "jpeg_draft", "flush_denormal", "feature_cache", "feature_views",
})
"""`TrainConfig` fields taken from a checkpoint: how the weights were trained and how their inputs
are read (``precision``, ``jpeg_draft``), all bounded by `TrainConfig` itself. Every field is in
exactly one of the two sets (a test checks it), so a new `TrainConfig` field must be classified."""

_TIMM_NAME = re.compile(r"[a-z0-9_]{1,128}(\.[a-z0-9_]{1,128})?")  # arch[.tag]; no "hf-hub:" / "local-dir:"
_UNPRINTABLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # controls, bidi overrides, separators, unassigned


def _printable(text: str) -> str:
    bad = next((c for c in text if unicodedata.category(c) in _UNPRINTABLE), None)
    if bad is not None:
        raise ValueError(f"holds the control or invisible character U+{ord(bad):04X}")
    return text


Text = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH), AfterValidator(_printable)]
Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE)]
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]
Mean = Annotated[float, Field(ge=-10.0, le=10.0)]
Std = Annotated[float, Field(ge=1e-3, le=10.0)]  # inputs are in [0, 1]; std 0 divides by zero


def _image_size(v: Any) -> int | tuple[int, int]:
    # An int or a pair, checked by hand: a pydantic union would name its members in the error.
    sides = list(v) if isinstance(v, list) and len(v) == 2 else [v]
    if not all(type(x) is int and MIN_SIDE <= x <= MAX_SIDE for x in sides):
        raise ValueError(f"must be an int or a pair of ints in [{MIN_SIDE}, {MAX_SIDE}]")
    return tuple(sides) if len(sides) == 2 else sides[0]


class _Schema(BaseModel):
    # strict: JSON true is not an int, "3" is not a number; frozen: a parsed header is a record.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False, protected_namespaces=())


class ModelKwargs(_Schema):
    """The allowed ``timm.create_model`` kwargs (`MODEL_KWARGS`); unset ones are not passed."""

    pad_type: Literal["", "same", "valid"] = Field(None)
    drop_rate: Rate = Field(None)
    drop_path_rate: Rate = Field(None)
    drop_block_rate: Rate = Field(None)
    global_pool: Literal["", "avg", "max", "avgmax", "catavgmax", "fast", "token", "map"] = Field(None)
    img_size: Annotated[Any, AfterValidator(_image_size)] = Field(None)
    dynamic_img_size: bool = Field(None)

    def as_kwargs(self) -> dict[str, Any]:
        """The kwargs the header set, as ``timm.create_model`` takes them."""
        return self.model_dump(exclude_unset=True)


class BackboneHeader(_Schema):
    """``backbone``: a timm architecture name (optionally ``.tag``) and allowed kwargs."""

    name: str
    model_kwargs: ModelKwargs = Field(default_factory=ModelKwargs)
    weights_source: Annotated[str, Field(max_length=4 * MAX_NAME_LENGTH), AfterValidator(_printable)] | None = None

    @field_validator("name")
    @classmethod
    def _known_to_timm(cls, v: str) -> str:
        import timm

        if not _TIMM_NAME.fullmatch(v) or not timm.is_model(v):
            raise ValueError("not a model in timm's registry (only plain names like 'resnet18' or "
                             "'resnet18.a1_in1k'; no 'hf-hub:' or 'local-dir:' prefix)")
        return v

    def to_config(self) -> BackboneConfig:
        """The `BackboneConfig` that rebuilds the model with random weights, no download, no file."""
        return BackboneConfig(name=self.name, pretrained=False, model_kwargs=self.model_kwargs.as_kwargs())


class DataConfigHeader(_Schema):
    """``data_config``: the preprocessing the weights expect, every value bounded."""

    input_size: tuple[Literal[3], Side, Side]
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"]
    mean: tuple[Mean, Mean, Mean]
    std: tuple[Std, Std, Std]
    # Eval resizes the short side to H / crop_pct: a tiny crop_pct would decode a huge image.
    # Above 1: timm's volo_d5_512 weights use 1.15.
    crop_pct: float = Field(ge=0.5, le=2.0)
    crop_mode: Literal["center", "squash", "border"] = "center"


def _bounded_policy(policy: FreezePolicy) -> FreezePolicy:
    lists = [policy.freeze, policy.unfreeze, *(p.freeze or [] for p in policy.phases),
             *(p.unfreeze or [] for p in policy.phases)]
    if len(policy.phases) > MAX_PHASES or sum(map(len, lists)) > MAX_PATTERNS:
        raise ValueError(f"holds more than {MAX_PHASES} phases or {MAX_PATTERNS} name patterns")
    if any(len(p) > MAX_NAME_LENGTH for names in lists for p in names):
        raise ValueError(f"holds a name pattern longer than {MAX_NAME_LENGTH} characters")
    return policy


class CalibrationHeader(_Schema):
    """``calibration``: the temperature and reject threshold fitted on the validation split."""

    temperature: float = Field(ge=0.05, le=20.0)
    reject_threshold: float = Field(ge=0.0, le=1.0)


class CheckpointHeader(_Schema):
    """The ``"tlkit"`` JSON document of a checkpoint, validated (see the module docstring).

    ``train_config`` is the file's, for the record; what `FineTuner.load` uses is
    `runtime_train_config` of it.
    """

    # NaN is a legitimate metric value (a diverged val_loss); the nested configs still refuse it.
    model_config = ConfigDict(allow_inf_nan=True)

    tlkit_version: Annotated[str, Field(max_length=64), AfterValidator(_printable)] | None = None
    backbone: BackboneHeader
    head: HeadConfig
    classes: list[Text] = Field(min_length=1, max_length=MAX_CLASSES)
    data_config: DataConfigHeader
    freeze_policy: Annotated[FreezePolicy, AfterValidator(_bounded_policy)]
    train_config: TrainConfig
    augment: AugmentConfig
    epoch: int = Field(0, ge=0, le=MAX_EPOCH)
    metrics: dict[Annotated[str, Field(max_length=MAX_NAME_LENGTH)], JsonValue] = Field(
        default_factory=dict, max_length=MAX_METRICS)
    calibration: CalibrationHeader | None = None
    thresholds: list[Annotated[float, Field(ge=0.0, le=1.0)]] | None = Field(None, max_length=MAX_CLASSES)

    @field_validator("train_config", mode="before")
    @classmethod
    def _drop_resources(cls, v: Any) -> Any:
        # Never used from a file (see RUNTIME_FIELDS), so never a reason to refuse one either.
        return {k: x for k, x in v.items() if k not in RUNTIME_FIELDS} if isinstance(v, dict) else v

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        seen: set[str] = set()
        dup = next((c for c in v if c in seen or seen.add(c)), None)
        if dup is not None:
            raise ValueError(f"class {dup!r} appears twice: labels would be ambiguous")
        return v

    @model_validator(mode="after")
    def _head_fits_classes(self) -> CheckpointHeader:
        n, hidden = self.head.num_classes, self.head.hidden_dim
        if n != len(self.classes):
            raise ValueError(f"header field head.num_classes is {n} but header field classes names "
                             f"{len(self.classes)} classes")
        if hidden is not None and hidden > MAX_HIDDEN_DIM:
            raise ValueError(f"header field head.hidden_dim is {hidden}, above the bound {MAX_HIDDEN_DIM}")
        if self.thresholds is not None and len(self.thresholds) != len(self.classes):
            raise ValueError(f"header field thresholds has {len(self.thresholds)} values for {len(self.classes)} classes")
        return self

    def data_config_dict(self) -> dict[str, Any]:
        """The data config as `FineTuner` keeps it (lists, JSON types)."""
        return self.data_config.model_dump(mode="json")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)  # repr escapes newlines and control characters: the message stays one line
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field(loc: tuple) -> str:
    # Keys come from the file too (an unknown kwarg, a metrics key): anything but a plain
    # identifier is shown as a short repr, so a key cannot break the message over lines.
    return ".".join(str(p) if re.fullmatch(r"[\w-]{1,64}", str(p), re.ASCII) else _short(p, 40) for p in loc)


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as ``header field a.b.c ...``."""
    field = _field(error["loc"])
    if error["type"] == "json_invalid":  # e.g. nested deeper than pydantic's parser goes
        return f"header metadata cannot be parsed ({error['msg']})"
    if not field:  # a check across fields; its message names them
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"header field {field} is missing"
    if error["type"] == "extra_forbidden":
        if field.startswith("backbone.model_kwargs."):
            return (f"header field {field} is not allowed: a checkpoint may pass only these timm kwargs: "
                    f"{', '.join(MODEL_KWARGS)}")
        return f"header field {field} is not allowed (unknown key)"
    msg = error["msg"].removeprefix("Value error, ")
    return f"header field {field}: {msg} (got {_short(error.get('input'))})"


def parse_header(meta: Any, path: str | Path) -> CheckpointHeader:
    """Validate a checkpoint's metadata against the schema.

    Args:
        meta: the ``"tlkit"`` JSON document, as `tlkit.load_checkpoint` returns it.
        path: the checkpoint file, for messages.

    Returns:
        The validated header.

    Raises:
        CheckpointError: ``"<path>: header field <dotted.field> ..."`` for the first field that
            fails (unknown, missing, out of bounds, not allowed); the message is one line.
    """
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: header metadata is a JSON {type(meta).__name__}, not an object")
    try:
        # Validated from JSON text so that strict mode still takes JSON arrays for tuples.
        return CheckpointHeader.model_validate_json(json.dumps(meta, allow_nan=True), strict=True)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise CheckpointError(f"{path}: {_describe(errors[0])}{more}") from e
    except (ValueError, RecursionError) as e:  # JSON nested too deep for pydantic's parser
        raise CheckpointError(f"{path}: header metadata cannot be parsed ({type(e).__name__})") from e


def unloadable_reason(meta: dict[str, Any]) -> str | None:
    """Why `parse_header` would refuse ``meta`` (``"header field ..."``), or ``None`` if it passes."""
    try:
        parse_header(meta, "-")
    except CheckpointError as e:
        return str(e).removeprefix("-: ")
    return None


def runtime_train_config(stored: TrainConfig, **settings: Any) -> TrainConfig:
    """The stored training settings, with this machine's resource settings instead of the file's.

    Every `RUNTIME_FIELDS` field takes its `TrainConfig` default (``num_workers=0``,
    ``device="auto"``, no cache folder, no compilation...) unless ``settings`` gives it.

    Args:
        stored: the checkpoint's ``train_config``.
        settings: the caller's `TrainConfig` fields (``device``, ``FineTuner.load``'s overrides).

    Raises:
        pydantic.ValidationError: a caller's setting is invalid (a ``ValueError``, naming it).
    """
    kept = stored.model_dump(exclude=set(RUNTIME_FIELDS))
    return TrainConfig(**{**kept, **settings})
