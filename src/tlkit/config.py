"""Validated, serialisable settings for every part of a tlkit run.

Every model here is a pydantic v2 model that rejects unknown keys and out-of-range values with an
error naming the field, and round-trips through YAML or JSON (`RunConfig.from_file`,
`RunConfig.to_file`). YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from tlkit._strict import StrictModel
from tlkit.freeze import FreezePolicy

__all__ = [
    "StrictModel",
    "DataConfigOverrides",
    "BackboneConfig",
    "HeadConfig",
    "AugmentConfig",
    "DatasetConfig",
    "TrainConfig",
    "RunConfig",
]


class DataConfigOverrides(StrictModel):
    """Overrides of timm's data config (preprocessing); ``None`` keeps the value from the weights.

    The defaults come from the weights' ``pretrained_cfg`` through
    ``timm.data.resolve_data_config``; set a field only when the weights were trained with
    something else (e.g. the offline MobileNetV2 file needs ``mean = std = (0.5, 0.5, 0.5)``).
    """

    input_size: tuple[int, int, int] | None = Field(
        None, description="(channels, height, width) of the model input, pixels."
    )
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"] | None = None
    crop_pct: float | None = Field(None, gt=0.0, le=1.0, description="Centre-crop fraction at eval.")
    crop_mode: Literal["center", "squash", "border"] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @field_validator("input_size")
    @classmethod
    def _positive_size(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and (v[0] != 3 or v[1] < 8 or v[2] < 8):
            raise ValueError(f"input_size must be (3, H, W) with H, W >= 8, got {v}")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"std values must be > 0, got {v}")
        return v


class BackboneConfig(StrictModel):
    """Which timm model to build and where its weights come from.

    Weight sources, in order: ``weights`` (a local safetensors or torch file) if set; else timm's
    hub download when ``pretrained`` is true; else random initialisation.
    """

    name: str = Field("mobilenetv2_100", min_length=1, description="Any name timm.create_model knows.")
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
        return v


class HeadConfig(StrictModel):
    """The new task head that replaces the pretrained classifier."""

    num_classes: int | None = Field(
        None, ge=1, description="Number of classes; None takes it from the training data."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability before each Linear.")
    hidden_dim: int | None = Field(None, ge=1, description="Width of an optional hidden layer.")
    activation: Literal["relu", "gelu", "silu"] = "relu"


class AugmentConfig(StrictModel):
    """Training augmentation passed to ``timm.data.create_transform(is_training=True)``.

    Defaults are deliberately light (transfer learning from ImageNet features needs less than
    training from scratch): random-resized-crop scale (0.5, 1.0) instead of timm's (0.08, 1.0).
    """

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    vflip: float = Field(0.0, ge=0.0, le=1.0)
    color_jitter: float = Field(0.1, ge=0.0, le=1.0, description="Ignored when auto_augment is set (as in timm).")
    auto_augment: str | None = Field(
        None,
        description="'trivialaugment' (torchvision's TrivialAugmentWide, Mueller & Hutter 2021), or a "
        "timm policy string: 'rand-m9-mstd0.5-inc1' (RandAugment, Cubuk et al. 2020), 'augmix-m5-w4-d2', "
        "'original', 'v0'.",
    )
    re_prob: float = Field(0.0, ge=0.0, le=1.0, description="Random-erasing probability (timm, Zhong et al. 2020).")

    @field_validator("auto_augment")
    @classmethod
    def _known_policy(cls, v: str | None) -> str | None:
        if v is None or v == "trivialaugment" or v.split("-")[0] in {"rand", "augmix", "original", "originalr", "v0", "v0r", "3a"}:
            return v
        raise ValueError(
            f"unknown auto_augment {v!r}: use 'trivialaugment' or a timm policy string starting with "
            "'rand-', 'augmix-', 'original', 'v0' or '3a'"
        )

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered_pair(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must be 0 < low <= high, got {v}")
        return v


class DatasetConfig(StrictModel):
    """An image-folder dataset (``root/<class>/<image>``) and its train/val split."""

    root: Path | None = Field(None, description="Folder with one sub-folder per class.")
    val_root: Path | None = Field(None, description="Separate validation folder; disables the split.")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Stratified validation share.")
    split_seed: int = Field(0, ge=0)
    num_folds: int | None = Field(
        None, ge=2, description="Cross-validation: split into this many stratified folds instead of val_fraction."
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

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(
        32, ge=1, description="Images per optimizer step in each process; the global batch is batch_size * world_size."
    )
    eval_batch_size: int | None = Field(
        None, ge=1,
        description="Images per forward pass in evaluate, predict and feature extraction. None: 16 on CPU "
        "(smaller batches stay in cache: MobileNetV2 bf16 predict ran at about 110 img/s at 16 against 70 "
        "at 64 on a 2-core EPYC), 64 on GPUs.",
    )
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="Peak learning rate of the head group.")
    weight_decay: float = Field(0.01, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD only.")
    warmup_epochs: float = Field(1.0, ge=0.0, description="Linear warm-up length, epochs.")
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="Final LR as a fraction of the peak.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip_norm: float | None = Field(None, gt=0.0)
    mixup_alpha: float = Field(0.0, ge=0.0, description="Mixup Beta(alpha, alpha) (Zhang et al. 2018); 0 = off.")
    cutmix_alpha: float = Field(0.0, ge=0.0, description="CutMix Beta(alpha, alpha) (Yun et al. 2019); 0 = off.")
    mixup_prob: float = Field(1.0, ge=0.0, le=1.0, description="Share of batches mixed when mixup/cutmix is on.")
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none",
        description="Cross-entropy class weights: 'balanced' = n / (num_classes * n_class) over the training "
        "set (scikit-learn's formula), or one weight per class.",
    )
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="Keep an exponential moving average of the weights (timm ModelEmaV3, with warm-up); "
        "validation, checkpoints and the model after fit use the average.",
    )
    unfreeze_warmup_epochs: float = Field(
        0.0, ge=0.0,
        description="Parameters that join at a phase boundary ramp their LR linearly from 0 over this many epochs "
        "(Adam's first steps on newly unfrozen weights are as large as the LR itself).",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many epochs without a better best_metric (counted from the last phase boundary)."
    )
    best_metric: Literal["top1", "macro_f1", "val_loss"] = "top1"
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 autocast on CPUs with native bf16 and on CUDA, else fp32."
    )
    channels_last: bool | None = Field(None, description="None: on for convolutional models.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
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
    progress: bool = True
    feature_cache: bool = Field(
        False,
        description="In epochs where only the classifier trains, compute the frozen backbone's "
        "pooled features once and train the classifier from them.",
    )
    feature_views: int = Field(
        0, ge=0, description="Cached inputs: 0 = the eval transform; K = K augmented views (epoch e uses view e % K)."
    )
    feature_cache_dir: Path | None = Field(None, description="Also keep cached features on disk here.")
    loggers: list[Literal["csv", "tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="Built-in logger callbacks (tlkit.loggers): 'csv' writes OUTPUT_DIR/metrics.csv, 'tensorboard' "
        "OUTPUT_DIR/tensorboard/ (needs tensorboard), 'mlflow' a local file store OUTPUT_DIR/mlruns (tlkit[mlflow]).",
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


class RunConfig(StrictModel):
    """Everything one training run needs; what ``tlkit train --config run.yaml`` reads."""

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    freeze: FreezePolicy = Field(default_factory=FreezePolicy)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DatasetConfig = Field(default_factory=DatasetConfig)
    output_dir: Path = Path("runs/latest")

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """Read a YAML (``.yaml``/``.yml``) or JSON file.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not a mapping, or the suffix is unknown.
            pydantic.ValidationError: a value is out of range or a key is unknown (names the field).
        """
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in {".yaml", ".yml"}:
            data = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"{path}: config must be .yaml, .yml or .json, got {path.suffix!r}")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: config must be a mapping at the top level, got {type(data).__name__}")
        return cls.model_validate(data)

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> RunConfig:
        """A copy with dotted ``KEY=VALUE`` overrides applied, values parsed as YAML.

        Example: ``cfg.with_overrides(["train.epochs=5", "data.augment.auto_augment=trivialaugment"])``.

        Raises:
            ValueError: an item without ``=``; pydantic ``ValidationError`` (a ``ValueError``)
                for an unknown key or a bad value, naming the field.
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
            node[last] = yaml.safe_load(value)
        return type(self).model_validate(data)

    def to_file(self, path: str | Path) -> Path:
        """Write YAML or JSON by suffix; returns the path."""
        path = Path(path)
        data = self.model_dump(mode="json")
        if path.suffix.lower() == ".json":
            text = json.dumps(data, indent=2)
        else:
            text = yaml.safe_dump(data, sort_keys=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path
