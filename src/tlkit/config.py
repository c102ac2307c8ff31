"""Validated, serialisable settings for every part of a tlkit run.

Every model here is a pydantic v2 model that rejects unknown keys and out-of-range values with an
error naming the field, and round-trips through YAML or JSON (`RunConfig.from_file`,
`RunConfig.to_file`). YAML is read with ``yaml.safe_load`` only.

Config files may come from strangers (a shared recipe, a bug report), so every number has an
upper bound that keeps a run within one machine's reach (the ``MAX_*`` constants below), integer
fields take whole numbers only (``epochs: 1e23`` or ``2.5`` is an error, not a rounded value),
floats must be finite, and a file that is not a readable YAML/JSON mapping is one `ConfigError`
naming the file, line and column.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import Field, field_validator, model_validator

from tlkit._config_text import MAX_CONFIG_BYTES, ConfigError, parse_json, parse_yaml, read_config_text  # noqa: F401 (re-exported)
from tlkit._fs import atomic_write_bytes
from tlkit._strict import StrictModel
from tlkit.freeze import FreezePolicy

__all__ = [
    "ConfigError",
    "best_key",
    "StrictModel",
    "DataConfigOverrides",
    "BackboneConfig",
    "HeadConfig",
    "AugmentConfig",
    "DatasetConfig",
    "TrainConfig",
    "RunConfig",
]

# Upper bounds. Each is far above any real run and far below what exhausts a machine before the
# first batch (a 100000 x 100000 input is a MemoryError in the first forward pass).
MAX_IMAGE_SIDE = 4096  # pixels, model input height and width
MAX_BATCH = 16_384  # images per step or forward pass
MAX_EPOCHS = 10_000
MAX_CLASSES = 100_000  # the one bound on a class count (configs, checkpoint headers, hub folders); ImageNet-21k has 21,843
MAX_HIDDEN_DIM = 65_536
# DataLoader workers are processes, each with its own copy of the dataset and transforms; past a
# few dozen the main process cannot take batches faster. A fixed bound (not os.cpu_count()) keeps
# one config file valid on every machine.
MAX_WORKERS = 64
MAX_FEATURE_VIEWS = 64  # cached augmented views: each is one pass over the data, kept in memory
MAX_FOLDS = 100
SEED_LIMIT = 2**32  # numpy's seed range: 0 <= seed < 2**32
# Accepted device strings; anything else would fail in torch.device or at model.to(...).
DEVICE_FORMS = "'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU index, e.g. 'cuda:1') or 'mps'"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,3})?")
# RandAugment / AugMix ops applied to every training image: more layers only slow training down.
MAX_AUGMENT_OPS = 10


def whole_number(value: Any) -> Any:
    """Refuse floats and booleans where an integer is meant (a before-validator).

    pydantic's lax mode turns ``2.0`` or ``1e15`` into an int and ``True`` into 1; a config that
    says ``epochs: 1e15`` or ``seed: true`` is a typo, not a request.

    Raises:
        ValueError: ``value`` is a bool or a float.
    """
    if isinstance(value, (bool, float)):
        raise ValueError(f"must be a whole number written without a decimal point or exponent, got {value!r}")
    return value


def check_device(device: str) -> str:
    """Return ``device`` if it is one of the accepted device strings.

    Raises:
        ValueError: any other string, listing the accepted forms.
    """
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ValueError(f"device must be {DEVICE_FORMS}, got {device!r}")
    return device


def _no_nul(path: Path | None) -> Path | None:
    # A NUL byte is legal in a Python string but in no file name: open() would fail later.
    if path is not None and "\x00" in str(path):
        raise ValueError(f"path contains a NUL character: {str(path)!r}")
    return path


def _json_like(value: Any, where: str, depth: int = 0) -> int:
    """Check ``value`` is plain data (what YAML and JSON hold); return its size in items.

    Raises:
        ValueError: another type, a non-finite float, a non-string key, or deeper than 16
            levels / more than 10,000 items (limits that also stop YAML alias bombs).
    """
    if depth > 16:
        raise ValueError(f"{where}: nested more than 16 levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value!r} is not a finite number")
    if value is None or isinstance(value, (str, int, float)):
        return 1
    if isinstance(value, (list, tuple)):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = [(f"{where}.{k}", v) for k, v in value.items()]
    else:
        raise ValueError(f"{where}: {type(value).__name__} is not plain data (str, number, bool, null, list, mapping)")
    size = 1
    for sub, v in items:
        size += _json_like(v, sub, depth + 1)
        if size > 10_000:
            raise ValueError(f"{where}: more than 10,000 items")
    return size


class DataConfigOverrides(StrictModel):
    """Overrides of timm's data config (preprocessing); ``None`` keeps the value from the weights.

    The defaults come from the weights' ``pretrained_cfg`` through
    ``timm.data.resolve_data_config``; set a field only when the weights were trained with
    something else (e.g. the offline MobileNetV2 file needs ``mean = std = (0.5, 0.5, 0.5)``).
    """

    input_size: tuple[int, int, int] | None = Field(
        None,
        description=f"(channels, height, width) of the model input, pixels: (3, H, W), 8 <= H, W <= {MAX_IMAGE_SIDE}.",
    )
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"] | None = Field(
        None, description="Resize filter of the eval (and training) transform.")
    # At least 0.5: eval resizes to input / crop_pct, so a tiny fraction asks for a huge image.
    crop_pct: float | None = Field(None, ge=0.5, le=1.0, description="Centre-crop fraction at eval, in [0.5, 1].")
    crop_mode: Literal["center", "squash", "border"] | None = Field(
        None, description="Eval view: 'center' crops crop_pct of the resized image, 'squash' resizes the whole "
        "frame to input_size (no crop), 'border' pads (timm's crop modes).")
    mean: tuple[float, float, float] | None = Field(None, description="Per-channel mean of [0, 1] pixels, in [0, 1].")
    std: tuple[float, float, float] | None = Field(None, description="Per-channel std, each in [0.001, 10].")

    @field_validator("input_size", mode="before")
    @classmethod
    def _whole_sizes(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            for x in v:
                whole_number(x)
        return v

    @field_validator("input_size")
    @classmethod
    def _positive_size(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and (v[0] != 3 or not all(8 <= side <= MAX_IMAGE_SIDE for side in v[1:])):
            raise ValueError(f"input_size must be (3, H, W) with 8 <= H, W <= {MAX_IMAGE_SIDE}, got {v}")
        return v

    @field_validator("mean")
    @classmethod
    def _unit_mean(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and not all(0.0 <= m <= 1.0 for m in v):
            raise ValueError(f"mean values must be in [0, 1] (pixels are scaled to [0, 1] first), got {v}")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        # A subnormal std passes "> 0" and turns every input pixel into inf.
        if v is not None and not all(1e-3 <= s <= 10.0 for s in v):
            raise ValueError(f"std values must be in [0.001, 10], got {v}")
        return v


def _check_timm_policy(policy: str) -> None:
    """Build the timm transform for ``policy`` once, so a malformed string fails here, not in fit.

    Raises:
        ValueError: timm cannot parse it (timm raises AssertionError or ValueError), or it asks
            for more than `MAX_AUGMENT_OPS` ops per image.
    """
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    kind = policy.split("-")[0]
    build = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform}.get(kind, auto_augment_transform)
    try:
        transform = build(policy, {})
    except Exception as e:  # noqa: BLE001 - timm's parsers assert; any failure is a bad string
        raise ValueError(f"auto_augment {policy!r} is not a valid timm policy ({type(e).__name__}: {e})") from None
    ops = max(getattr(transform, "num_layers", 0), getattr(transform, "width", 0), getattr(transform, "depth", 0))
    if ops > MAX_AUGMENT_OPS:
        raise ValueError(f"auto_augment {policy!r} applies {ops} ops per image; at most {MAX_AUGMENT_OPS}")


class BackboneConfig(StrictModel):
    """Which timm model to build and where its weights come from.

    Weight sources, in order: ``weights`` (a local safetensors or torch file) if set; else timm's
    hub download when ``pretrained`` is true; else random initialisation.
    """

    name: str = Field(
        "mobilenetv2_100", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:/-]+$",
        description="Any name timm.create_model knows (letters, digits and _ . : / - only).",
    )
    pretrained: bool = Field(True, description="Load pretrained weights (from `weights` or the hub).")
    weights: Path | None = Field(None, description="Local weights file (.safetensors, .pt, .pth, .bin).")
    key_mapping: Literal["auto", "exact", "by_order"] = Field(
        "auto",
        description="How file keys map onto the model: by name, by order (same shapes), or name then order.",
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for timm.create_model, e.g. pad_type."
    )
    data_config: DataConfigOverrides = Field(default_factory=DataConfigOverrides)

    @field_validator("model_kwargs")
    @classmethod
    def _no_reserved_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        reserved = {"pretrained", "num_classes", "model_name", "pretrained_cfg_overlay"} & set(v)
        if reserved:
            raise ValueError(
                f"model_kwargs may not set {sorted(reserved)}: use BackboneConfig.pretrained / "
                "HeadConfig.num_classes instead"
            )
        # Written to config.yaml and the checkpoint header: plain, finite data only.
        _json_like(v, "model_kwargs")
        return v

    _paths = field_validator("weights")(_no_nul)


class HeadConfig(StrictModel):
    """The new task head that replaces the pretrained classifier."""

    num_classes: int | None = Field(
        None, ge=1, le=MAX_CLASSES, description="Number of classes; None takes it from the training data."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability before each Linear.")
    hidden_dim: int | None = Field(None, ge=1, le=MAX_HIDDEN_DIM, description="Width of an optional hidden layer.")
    activation: Literal["relu", "gelu", "silu"] = Field("relu", description="Activation after the hidden layer.")
    multilabel: bool = Field(
        False, description="Each image may have several labels: sigmoid outputs and binary cross-entropy, per-label "
        "thresholds tuned on the validation split (set by tlkit train from a multi-label table).")
    head_layers: Literal["keep", "reset"] = Field(
        "keep",
        description="Pretrained layers of the old head around its final Linear (the BatchNorm of LeViT's "
        "NormLinear, fc1/norm of MLP heads): 'keep' their weights and replace only the final layer(s), or "
        "'reset' them with timm's reset_classifier (fresh initialisation).",
    )

    _whole = field_validator("num_classes", "hidden_dim", mode="before")(whole_number)


class AugmentConfig(StrictModel):
    """Training augmentation passed to ``timm.data.create_transform(is_training=True)``.

    Defaults are deliberately light (transfer learning from ImageNet features needs less than
    training from scratch): random-resized-crop scale (0.5, 1.0) instead of timm's (0.08, 1.0).
    """

    scale: tuple[float, float] = Field((0.5, 1.0), description="Random-resized-crop area range, fractions of the image.")
    ratio: tuple[float, float] = Field((3.0 / 4.0, 4.0 / 3.0), description="Random-resized-crop aspect range (w / h).")
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="Horizontal-flip probability.")
    vflip: float = Field(0.0, ge=0.0, le=1.0, description="Vertical-flip probability.")
    color_jitter: float = Field(0.1, ge=0.0, le=1.0, description="Ignored when auto_augment is set (as in timm).")
    auto_augment: str | None = Field(
        None,
        description="'trivialaugment' (torchvision's TrivialAugmentWide, Mueller & Hutter 2021), or a "
        "timm policy string: 'rand-m9-mstd0.5-inc1' (RandAugment, Cubuk et al. 2020), 'augmix-m5-w4-d2', "
        "'original', 'v0'.",
    )
    re_prob: float = Field(0.0, ge=0.0, le=1.0, description="Random-erasing probability (timm, Zhong et al. 2020).")
    background: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Probability of swapping a photo's plain, light background for a generated floor, table or ground "
        "texture, the object rotated and rescaled (tlkit.background.BackgroundSwap; for photos taken on one plain "
        "background, such as TrashNet's posterboard).",
    )

    @field_validator("auto_augment")
    @classmethod
    def _known_policy(cls, v: str | None) -> str | None:
        if v is None or v == "trivialaugment":
            return v
        if v.split("-")[0] not in {"rand", "augmix", "original", "originalr", "v0", "v0r", "3a"}:
            raise ValueError(
                f"unknown auto_augment {v!r}: use 'trivialaugment' or a timm policy string starting with "
                "'rand-', 'augmix-', 'original', 'v0' or '3a'"
            )
        _check_timm_policy(v)
        return v

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered_pair(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must be 0 < low <= high, got {v}")
        return v

    @field_validator("scale")
    @classmethod
    def _area_fraction(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[1] > 1.0:
            raise ValueError(f"scale is a fraction of the image area: high must be <= 1, got {v}")
        return v

    @field_validator("ratio")
    @classmethod
    def _sane_ratio(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0.01 <= v[0] and v[1] <= 100.0):
            raise ValueError(f"ratio (width / height) must lie in [0.01, 100], got {v}")
        return v


class DatasetConfig(StrictModel):
    """An image-folder dataset (``root/<class>/<image>``) and its train/val split."""

    root: Path | None = Field(
        None, description="Folder with one sub-folder per class; with `labels`, the folder the table's paths start "
        "from (default: the table's folder).")
    labels: Path | None = Field(
        None, description="A label table instead of class folders: a CSV/TSV with a path column and a label column "
        "(several labels joined by | or ;), or 0/1 columns per label (multi-label), and an optional split column "
        "(train/val/test); see tlkit.table.")
    path_column: str | None = Field(None, description="The table's column of image paths (default: found by name).")
    label_column: str | None = Field(None, description="The table's column of labels (default: found by name).")
    label_columns: list[str] | None = Field(
        None, description="The table's 0/1 columns, one per label (multi-label; default: every 0/1 column when "
        "there is no label column).")
    val_root: Path | None = Field(None, description="Separate validation folder; disables the split.")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Stratified validation share.")
    split_seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Seed of the split, 0 <= seed < 2**32.")
    num_folds: int | None = Field(
        None, ge=2, le=MAX_FOLDS,
        description="Cross-validation: split into this many stratified folds instead of val_fraction.",
    )
    fold: int = Field(0, ge=0, description="Which fold is the validation set (with num_folds).")
    classes: list[str] | None = Field(None, description="Class names in index order; default sorted folders.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    bad_images: Literal["skip", "error"] = Field(
        "skip",
        description="Unusable image files: 'skip' reports and drops them before training; 'error' fails "
        "before training, listing them all.",
    )
    allow_empty_classes: bool = Field(
        False, description="Keep a class whose folder has no usable image instead of failing."
    )

    _whole = field_validator("split_seed", "num_folds", "fold", mode="before")(whole_number)
    _paths = field_validator("root", "val_root", "labels")(_no_nul)

    def describe_split(self, names_only: bool = False) -> str:
        """The validation split in words, for reports and model cards (``names_only``: folder
        names instead of paths, for what is shared beyond this machine)."""
        def shown(folder: Path | None) -> str:
            return folder.name if names_only and folder is not None else str(folder)

        if self.val_root is not None:
            return f"validation folder {shown(self.val_root)}"
        if self.labels is not None:
            return (f"rows of {shown(self.labels)}: its split column where it has one, else a stratified "
                    f"{self.val_fraction:.0%} held out (split_seed {self.split_seed})")
        if self.num_folds is not None:
            return f"fold {self.fold + 1} of {self.num_folds} stratified folds (split_seed {self.split_seed})"
        return f"stratified {self.val_fraction:.0%} of {shown(self.root)} held out (split_seed {self.split_seed})"

    @field_validator("classes")
    @classmethod
    def _folder_names(cls, v: list[str] | None) -> list[str] | None:
        # Each name is a sub-folder of root.
        if v is None:
            return v
        if len(v) > MAX_CLASSES:
            raise ValueError(f"at most {MAX_CLASSES} classes, got {len(v)}")
        bad = [c for c in v if not c or c in {".", ".."} or "/" in c or "\x00" in c]
        if bad:
            raise ValueError(f"class names must be folder names (not empty, '.', '..', no '/' or NUL): {bad[:5]}")
        repeated = sorted(c for c, n in Counter(v).items() if n > 1)
        if repeated:
            raise ValueError(f"class names repeat: {repeated[:5]}")
        return v

    @model_validator(mode="after")
    def _fold_in_range(self) -> DatasetConfig:
        if self.num_folds is not None and self.fold >= self.num_folds:
            raise ValueError(f"fold {self.fold} is out of range for num_folds={self.num_folds}")
        if self.num_folds is not None and self.val_root is not None:
            raise ValueError("num_folds and val_root exclude each other")
        return self


class TrainConfig(StrictModel):
    """Optimisation and loop settings for `tlkit.FineTuner`.

    Defaults follow common timm fine-tuning practice: AdamW (Loshchilov & Hutter, 2019) with a
    linear warm-up then cosine decay (Loshchilov & Hutter, 2017, SGDR), no weight decay on
    biases and normalisation parameters.
    """

    epochs: int = Field(10, ge=1, le=MAX_EPOCHS, description=f"Training epochs, 1 to {MAX_EPOCHS}.")
    batch_size: int = Field(
        32, ge=1, le=MAX_BATCH,
        description="Images per optimizer step in each process; the global batch is batch_size * world_size.",
    )
    accumulate_steps: int = Field(
        1, ge=1, le=1024,
        description="Gradient accumulation: micro-batches of batch_size images summed into one optimizer step, so "
        "each step sees accumulate_steps * batch_size images at the memory of one micro-batch (Lightning's "
        "accumulate_grad_batches). Steps, the LR schedule and warm-up count optimizer steps.",
    )
    eval_batch_size: int | None = Field(
        None, ge=1, le=MAX_BATCH,
        description="Images per forward pass in evaluate, predict and feature extraction. None: 16 on CPU "
        "(smaller batches stay in cache: MobileNetV2 bf16 predict ran at about 110 img/s at 16 against 70 "
        "at 64 on a 2-core EPYC), 64 on GPUs.",
    )
    optimizer: str = Field(
        "adamw", max_length=40,
        description="'adamw' (Loshchilov & Hutter 2019), 'sgd' with momentum, or any name of timm's optimizer "
        "registry (timm.optim.list_optimizers(): 'lamb', 'lion', 'adan', 'nadamw'...), built with "
        "timm.optim.create_optimizer_v2 over tlkit's parameter groups.")
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="Peak learning rate of the head group.")
    weight_decay: float = Field(0.01, ge=0.0, le=10.0, description="Decoupled weight decay; never on biases and norms.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD only.")
    warmup_epochs: float = Field(1.0, ge=0.0, le=MAX_EPOCHS, description="Linear warm-up length, epochs.")
    schedule: Literal["cosine", "linear", "poly", "step", "tanh", "constant"] = Field(
        "cosine", description="LR shape after the warm-up, per optimizer step (timm's --sched names; see "
        "tlkit.schedule.lr_factor).")
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="Final LR as a fraction of the peak.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Cross-entropy label smoothing (Szegedy et al. 2016), in [0, 1).")
    grad_clip_norm: float | None = Field(None, gt=0.0, description="Clip the gradients' global L2 norm to this; None: no clipping.")
    mixup_alpha: float = Field(
        0.0, ge=0.0, le=100.0, description="Mixup Beta(alpha, alpha) (Zhang et al. 2018); 0 = off.")
    cutmix_alpha: float = Field(
        0.0, ge=0.0, le=100.0, description="CutMix Beta(alpha, alpha) (Yun et al. 2019); 0 = off.")
    mixup_prob: float = Field(1.0, ge=0.0, le=1.0, description="Share of batches mixed when mixup/cutmix is on.")
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none",
        description="Cross-entropy class weights: 'balanced' = n / (num_classes * n_class) over the training "
        "set (scikit-learn's formula), or one weight per class.",
    )
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle",
        description="Order of training images: 'shuffle' (each image once per epoch) or 'balanced' (as many draws "
        "per epoch as images, with replacement, each image weighted 1 / its class size, so every class is drawn "
        "equally often; PyTorch's WeightedRandomSampler rule). The LR schedule counts the same steps either way.",
    )
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="Keep an exponential moving average of the weights (timm ModelEmaV3, with warm-up); "
        "validation, checkpoints and the model after fit use the average.",
    )
    wise_ft: float | None = Field(
        None, gt=0.0, le=1.0,
        description="WiSE-FT (Wortsman et al. 2022): from the first phase boundary on, validate, checkpoint and keep "
        "(1 - wise_ft) * the weights at that boundary (the linear probe) + wise_ft * the current weights; None: off.",
    )
    unfreeze_warmup_epochs: float = Field(
        0.0, ge=0.0, le=MAX_EPOCHS,
        description="Parameters that join at a phase boundary ramp their LR linearly from 0 over this many epochs "
        "(Adam's first steps on newly unfrozen weights are as large as the LR itself).",
    )
    time_budget: float | None = Field(
        None, gt=0.0, le=1e7,
        description="Training time budget, seconds: training stops after the epoch that would otherwise let the "
        "next one end past it (the mean epoch so far predicts the next), so the run ends within the budget unless "
        "one epoch is longer than it; None: no budget.",
    )
    auto: bool = Field(
        False, description="Set by the 'auto' recipe: epochs and phases are fitted to the training data when the run "
        "starts (tlkit.recipes.adapt_to_data); the recorded config holds the result.",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, le=MAX_EPOCHS,
        description="Stop after this many epochs without a better best_metric (counted from the last phase boundary).",
    )
    best_metric: Literal["top1", "macro_f1", "val_loss", "map", "micro_f1"] = Field(
        "top1", description="Which validation metric picks best.safetensors (and early stopping watches); a "
        "multi-label run reads 'top1' as 'map' (mean average precision).")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Seed of every RNG, 0 <= seed < 2**32 (numpy's range).")
    device: str = Field("auto", description=f"One of {DEVICE_FORMS}.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 autocast on CPUs with native bf16 and on CUDA, else fp32."
    )
    channels_last: bool | None = Field(None, description="None: on for convolutional models.")
    num_workers: int = Field(
        0, ge=0, le=MAX_WORKERS, description=f"DataLoader worker processes, at most {MAX_WORKERS}.")
    jpeg_draft: bool = Field(
        True,
        description="Eval, feature extraction and predict: decode JPEGs at 1/2, 1/4 or 1/8 scale "
        "(libjpeg DCT scaling) when the shorter side stays at least the eval resize size. "
        "Training augmentation always decodes in full.",
    )
    compile: bool = Field(False, description="Train and evaluate through torch.compile(model) (slow first steps).")
    flush_denormal: bool = Field(
        True, description="On CPU, flush subnormal floats to zero during fit/evaluate/predict (restored after)."
    )
    progress: bool | Literal["epochs"] = Field(
        True,
        description="Print progress: True, one plain line per epoch plus tqdm bars when the output is a "
        "terminal (a pipe or a log file never gets bar frames); 'epochs', the epoch lines only; False, nothing.",
    )
    feature_cache: bool = Field(
        False,
        description="In epochs where only the classifier trains, compute the frozen backbone's "
        "pooled features once and train the classifier from them.",
    )
    feature_views: int = Field(
        0, ge=0, le=MAX_FEATURE_VIEWS,
        description="Cached inputs: 0 = the eval transform; K = K augmented views (epoch e uses view e % K).",
    )
    feature_cache_dir: Path | None = Field(None, description="Also keep cached features on disk here.")
    loggers: list[Literal["csv", "tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="Built-in logger callbacks (tlkit.loggers): 'csv' writes OUTPUT_DIR/metrics.csv, 'tensorboard' "
        "OUTPUT_DIR/tensorboard/ (tlkit[tensorboard]), 'mlflow' a run in the local store "
        "sqlite:///OUTPUT_DIR/mlflow.db or in MLFLOW_TRACKING_URI (tlkit[mlflow]).",
    )
    distributed: Literal["auto", "off"] = Field(
        "auto",
        description="'auto': under torchrun (WORLD_SIZE > 1) join the process group (NCCL on CUDA, gloo on CPU) "
        "and train with DistributedDataParallel; 'off': always one process.",
    )
    sync_batchnorm: bool = Field(
        False, description="Under DDP, convert BatchNorm to SyncBatchNorm (CUDA only; timm's convert_sync_batchnorm)."
    )
    find_unused_parameters: bool = Field(
        False,
        description="DDP's find_unused_parameters, for models whose forward skips trainable parameters. Frozen "
        "parameters never need it: tlkit rewraps DDP at each phase boundary.",
    )

    _whole = field_validator(
        "epochs", "batch_size", "eval_batch_size", "early_stopping_patience", "seed", "num_workers", "feature_views",
        "accumulate_steps", mode="before",
    )(whole_number)
    _device = field_validator("device")(check_device)
    _paths = field_validator("feature_cache_dir")(_no_nul)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        if v in ("adamw", "sgd"):
            return v
        import difflib

        from timm.optim import list_optimizers

        names = list_optimizers()
        if v not in names:
            close = difflib.get_close_matches(v, names, n=3)
            raise ValueError(f"unknown optimizer {v!r}; use 'adamw', 'sgd' or a timm optimizer name"
                             + (f" (did you mean {', '.join(close)}?)" if close else ""))
        return v

    @field_validator("class_weights")
    @classmethod
    def _usable_weights(cls, v: str | list[float]) -> str | list[float]:
        if isinstance(v, list):
            if not 1 <= len(v) <= MAX_CLASSES:
                raise ValueError(f"class_weights needs 1 to {MAX_CLASSES} values, got {len(v)}")
            if min(v) < 0 or max(v) == 0:
                raise ValueError("class_weights must be >= 0 with at least one > 0")
        return v

    @model_validator(mode="after")
    def _mixup_needs_even_batches(self) -> TrainConfig:
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix mix each batch with its reverse: batch_size must be even, got {self.batch_size}")
        return self

    @model_validator(mode="after")
    def _warmup_within_training(self) -> TrainConfig:
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) is longer than epochs ({self.epochs})"
            )
        return self

    @property
    def bars(self) -> bool:
        """Whether tqdm bars may show (on a terminal only): ``progress`` is True."""
        return self.progress is True


def _choices(annotation: Any) -> list[Any]:
    """The values a ``Literal`` annotation (possibly inside ``X | None`` or ``Literal | list``) allows."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [v for arg in get_args(annotation) for v in _choices(arg)]


def _allowed(info: Any) -> str:
    """`` One of: a, b.`` / `` Range: ...`` for a field's template comment, from its type and bounds."""
    choices = _choices(info.annotation)
    if choices:
        return " One of: " + ", ".join(repr(c) for c in choices) + "."
    bounds = {k: getattr(m, k.lower()) for m in info.metadata for k in ("Ge", "Gt", "Le", "Lt")
              if type(m).__name__ == k}
    low = f">= {bounds['Ge']}" if "Ge" in bounds else (f"> {bounds['Gt']}" if "Gt" in bounds else "")
    high = f"<= {bounds['Le']}" if "Le" in bounds else (f"< {bounds['Lt']}" if "Lt" in bounds else "")
    return f" Range: {', '.join(x for x in (low, high) if x)}." if low or high else ""


def _commented(model: type, data: dict[str, Any], depth: int) -> list[str]:
    """YAML lines for ``data`` (a dump of ``model``), each field's description as a comment above it."""
    pad, lines = "  " * depth, []
    for name, value in data.items():
        info = model.model_fields.get(name)
        sub = getattr(info, "annotation", None)
        if info is not None and info.description:
            lines.append(f"{pad}# {info.description}" + _allowed(info))
        if isinstance(value, dict) and value and isinstance(sub, type) and issubclass(sub, StrictModel):
            lines.append(f"{pad}{name}:")
            lines += _commented(sub, value, depth + 1)
        else:
            text = yaml.safe_dump({name: value}, sort_keys=False, default_flow_style=True, width=10**6).strip()
            lines.append(pad + text.removeprefix("{").removesuffix("}"))
    return lines


class RunConfig(StrictModel):
    """Everything one training run needs; what ``tlkit train --config run.yaml`` reads."""

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    freeze: FreezePolicy = Field(default_factory=FreezePolicy)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DatasetConfig = Field(default_factory=DatasetConfig)
    output_dir: Path | None = Field(
        None, description="The run folder. None: a new folder for every run, "
        "runs/<backbone.name>/<YYYYmmdd-HHMMSS> (see RunConfig.with_run_dir); a folder that holds a "
        "run is refused unless resumed or overwritten.")

    _paths = field_validator("output_dir")(_no_nul)

    # The path fields of a run: relative ones in a file are relative to that file's folder.
    PATH_FIELDS: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("backbone", "weights"), ("data", "root"), ("data", "val_root"), ("data", "labels"), ("train", "feature_cache_dir"),
        ("output_dir",))

    def with_paths(self, change: Callable[[Path], Path]) -> RunConfig:
        """A copy with ``change`` applied to every path field that is set (`PATH_FIELDS`)."""
        data = self.model_dump()
        for *parents, leaf in self.PATH_FIELDS:
            node = data
            for key in parents:
                node = node[key]
            if node[leaf] is not None:
                node[leaf] = change(Path(node[leaf]))
        return type(self).model_validate(data)

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """Read a YAML (``.yaml``/``.yml``) or JSON file (UTF-8, at most 4 MiB).

        YAML is read with ``yaml.safe_load``, after a check of the node tree that refuses tags
        other than plain YAML's, repeated keys and alias bombs.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ConfigError: (a ``ValueError``) the message starts with ``path``: an unknown suffix, a
                directory, not UTF-8, a YAML or JSON syntax error (with line and column), an
                unsupported YAML tag such as ``!!python/object``, a repeated key, or a top level
                that is not a mapping.
            pydantic.ValidationError: a value is out of range or a key is unknown (names the field).

        Relative paths in the file (``data.root``, ``data.val_root``, ``backbone.weights``,
        ``train.feature_cache_dir``, ``output_dir``) are relative to the file's folder, as
        mkdocs and most build tools read theirs, so a config works from any current folder.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in {".yaml", ".yml", ".json"}:
            raise ConfigError(f"{path}: config must be .yaml, .yml or .json, got {path.suffix!r}")
        text = read_config_text(path)
        data = parse_json(text, str(path)) if suffix == ".json" else parse_yaml(text, str(path))
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: config must be a mapping at the top level, got {type(data).__name__}")
        base = path.resolve().parent
        return cls.model_validate(data).with_paths(lambda p: p if p.is_absolute() else base / p)

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> RunConfig:
        """A copy with dotted ``KEY=VALUE`` overrides applied, values parsed as YAML.

        Example: ``cfg.with_overrides(["train.epochs=5", "data.augment.auto_augment=trivialaugment"])``.

        Raises:
            ValueError: an item without ``=``, or a path through a value that is not a section;
                `ConfigError` for a value that is not plain YAML (as in `from_file`); pydantic
                ``ValidationError`` (a ``ValueError``) for an unknown key or a bad value, naming
                the field.
        """
        data = self.model_dump(mode="json")
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"override must be KEY=VALUE (e.g. train.epochs=5), got {item!r}")
            node = data
            *parents, last = key.split(".")
            for k in parents:
                node = node.setdefault(k, {})
                if not isinstance(node, dict):
                    raise ValueError(f"override {item!r}: {k!r} is not a section")
            node[last] = parse_yaml(value, f"override {item!r}")
        return type(self).model_validate(data)

    def with_run_dir(self, root: str | Path = "runs") -> RunConfig:
        """This config with ``output_dir`` set: itself when set, else a folder no run uses yet.

        The new folder is ``<root>/<backbone.name>/<YYYYmmdd-HHMMSS>`` (local time), with ``-2``,
        ``-3``... appended when a run started in the same second; it is not created here.
        """
        if self.output_dir is not None:
            return self
        base = Path(root) / self.backbone.name.replace(":", "_").replace("/", "_") / time.strftime("%Y%m%d-%H%M%S")
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        return self.model_copy(update={"output_dir": path})

    def to_yaml(self, comments: bool = False) -> str:
        """This config as YAML; with ``comments``, each field's description above it (a template)."""
        data = self.model_dump(mode="json")
        if not comments:
            return yaml.safe_dump(data, sort_keys=False)
        return "\n".join(_commented(type(self), data, 0)) + "\n"

    def to_file(self, path: str | Path) -> Path:
        """Write YAML or JSON by suffix, path fields made absolute (the file reads the same anywhere); returns the path.

        Raises:
            tlkit._fs.SymlinkRefused: (an ``OSError``) ``path`` is a symbolic link.
        """
        path = Path(path)
        data = self.with_paths(lambda p: p.absolute()).model_dump(mode="json")
        if path.suffix.lower() == ".json":
            text = json.dumps(data, indent=2)
        else:
            text = yaml.safe_dump(data, sort_keys=False)
        # Atomic, and never through a link planted in a run folder (tlkit._fs).
        return atomic_write_bytes(path, text.encode("utf-8"))


def best_key(config: TrainConfig, multilabel: bool) -> str:
    """The record key that picks the best checkpoint: ``best_metric``, with ``top1`` read as ``map``
    for a multi-label run (which has no top-1), and ``map`` / ``micro_f1`` as ``top1`` for a single-label one."""
    key = config.best_metric
    if multilabel and key == "top1":
        return "map"
    if not multilabel and key in ("map", "micro_f1"):
        return "top1"
    return key
