"""The training loop: fit, evaluate, predict, checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from tlkit._header import parse_header, runtime_train_config, unloadable_reason
from tlkit._meta_check import check_header_fits_weights
from tlkit.backbone import create_backbone, resolve_data_config
from tlkit.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint,
    save_training_state,
)
from tlkit.config import AugmentConfig, BackboneConfig, HeadConfig, RunConfig, TrainConfig
from tlkit.data import ImageFolderDataset, create_transforms, eval_resize_size, skip_none_collate
from tlkit.features import FeatureCache, classifier_is_last_step, extract_features, seeded, weights_digest
from tlkit.freeze import FreezePolicy, cosine_lr_factor
from tlkit.head import HeadReplacer, TaskHead, classifier_module_names, classifier_param_names
from tlkit.images import MAX_BYTES, MAX_PIXELS, load_image, to_rgb
from tlkit.lr_finder import LRFinderResult
from tlkit.metrics import ClassificationMetrics
from tlkit.distributed import (DistributedContext, all_gather_object, all_reduce_sum, barrier, broadcast_object,
                               gather_shards, init_distributed, shard_indices)
from tlkit.tta import check_tta_mode, tta_log_probs

__all__ = ["FineTuner", "Prediction", "flush_denormal", "resolve_device", "resolve_precision"]

_LOWER_IS_BETTER = {"val_loss"}
_RUN_FILES = ("last.state.pt", "last.safetensors", "best.safetensors", "metrics.jsonl")


@dataclass
class Prediction:
    """The prediction for one image.

    Attributes:
        label: the most probable class name.
        index: its class index.
        probability: its softmax probability, in [0, 1].
        probabilities: every class name with its probability (sums to 1).
    """

    label: str
    index: int
    probability: float
    probabilities: dict[str, float]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else Apple MPS if available, else CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; ``None`` means plain float32.

    ``"auto"`` picks bfloat16 on CUDA GPUs that support it (else float16) and on CPUs with
    native bfloat16 instructions (AVX512-BF16 / AMX, as reported by oneDNN), else float32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
        except (AttributeError, RuntimeError):
            return None
    return None


def denormals_flushed() -> bool:
    """Whether the CPU currently flushes subnormal floats to zero (torch has no getter)."""
    return bool((torch.full((1,), 1e-39) * 2).item() == 0.0)


@contextlib.contextmanager
def flush_denormal(enabled: bool = True):
    """Flush subnormal floats to zero inside the block, then restore the previous setting.

    Subnormal (denormal) floats, common in fine-tuned weights, moments and activations, take a
    slow path on x86 CPUs; flushing them (``torch.set_flush_denormal``) changes values below
    1.2e-38 only.
    """
    if not enabled:
        yield
        return
    before = denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def _infer_head_config(model: nn.Module, num_classes: int) -> HeadConfig:
    head = model.get_submodule(classifier_module_names(model)[0])
    if isinstance(head, TaskHead):
        hidden = head.hidden.out_features if hasattr(head, "hidden") else None
        act = next((k for k, v in {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}.items()
                    if hasattr(head, "act") and isinstance(head.act, v)), "relu")
        return HeadConfig(num_classes=num_classes, dropout=head.drop.p, hidden_dim=hidden, activation=act)
    return HeadConfig(num_classes=num_classes)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class FineTuner:
    """Fine-tune a timm model: fit, evaluate, predict, save and load.

    Args:
        model: a timm model whose classifier has already been replaced (see
            `HeadReplacer`); output logits ``(B, len(classes))``.
        classes: class names in index order.
        policy: which parameters train at each epoch; default full fine-tune.
        config: optimisation and loop settings.
        data_config: timm data config (see `tlkit.resolve_data_config`); default from the
            model's ``pretrained_cfg`` with the backbone config's overrides. Saved in every checkpoint and used by `predict`.
        augment: training augmentation.
        output_dir: run folder for checkpoints and ``metrics.jsonl``; ``None`` writes nothing.
        backbone: how the model was built; stored so `load` can rebuild it. Default: the config
            `create_backbone` attached to the model, else its timm architecture name with no
            extra kwargs.
        head: the head's config; default inferred from the model.

    Use `from_config` to build everything from a `RunConfig`.

    Under ``torchrun`` (``config.distributed="auto"``) the same code trains on every process
    with ``DistributedDataParallel``; see `tlkit.distributed` and the "Distributed training"
    docs page. ``config.batch_size`` is then per process.

    Attributes:
        dist: this process's place in the process group, ``None`` in a single process.
        is_main: whether this process writes files and prints (rank 0, or the only process).
        checkpoint_metadata: the header of the checkpoint `load` read (backbone, weights
            source, classes, data config, configs, epoch, ``metrics``); ``None`` otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        classes: Sequence[str],
        *,
        policy: FreezePolicy | None = None,
        config: TrainConfig | None = None,
        data_config: dict[str, Any] | None = None,
        augment: AugmentConfig | None = None,
        output_dir: str | Path | None = None,
        backbone: BackboneConfig | None = None,
        head: HeadConfig | None = None,
    ) -> None:
        self.classes = list(classes)
        self.policy = policy or FreezePolicy()
        self.config = config or TrainConfig()
        self.augment = augment or AugmentConfig()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        self.backbone = backbone or getattr(model, "tlkit_backbone_config", None) or BackboneConfig(name=arch, pretrained=False)
        self.data_config = data_config or resolve_data_config(model, self.backbone.data_config)
        self.head = head or _infer_head_config(model, len(self.classes))
        if self.head.num_classes is None:
            self.head = self.head.model_copy(update={"num_classes": len(self.classes)})
        if self.head.num_classes != len(self.classes):
            raise ValueError(f"head has {self.head.num_classes} classes but {len(self.classes)} class names were given")
        # Under torchrun, join the process group before picking the device (cuda:LOCAL_RANK).
        self.dist: DistributedContext | None = (
            init_distributed(self.config.device) if self.config.distributed == "auto" else None)
        self.is_main = self.dist is None or self.dist.is_main
        self.device = resolve_device(self.config.device)
        if self.dist is not None and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.amp_dtype = resolve_precision(self.config.precision, self.device)
        has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
        self.channels_last = self.config.channels_last if self.config.channels_last is not None else has_conv
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_transform, self.eval_transform = create_transforms(self.data_config, self.augment)
        self.draft_size = eval_resize_size(self.data_config) if self.config.jpeg_draft else None
        self.eval_batch_size: int = self.config.eval_batch_size or (16 if self.device.type == "cpu" else 64)
        self._compiled: nn.Module | None = None
        self.ema: nn.Module | None = None  # timm ModelEmaV3 while config.ema_decay is set
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 and self.device.type == "cuda" else None
        self.step = 0
        self.epoch = 0
        self.best: dict[str, Any] = {"metric": None, "epoch": None}
        self.history: list[dict[str, Any]] = []
        self.feature_cache = FeatureCache(self.config.feature_cache_dir)
        self.checkpoint_metadata: dict[str, Any] | None = None
        self._ddp: nn.Module | None = None
        self._ddp_key: tuple | None = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: RunConfig, classes: Sequence[str]) -> FineTuner:
        """Build backbone, head, policy and loop from a `RunConfig`.

        Raises:
            ValueError / RuntimeError / FileNotFoundError: as `tlkit.create_backbone`.
        """
        model = create_backbone(config.backbone)
        head = config.head.model_copy(update={"num_classes": config.head.num_classes or len(classes)})
        HeadReplacer.from_config(head).apply(model)
        return cls(
            model,
            classes,
            policy=config.freeze,
            config=config.train,
            data_config=resolve_data_config(model, config.backbone.data_config),
            augment=config.data.augment,
            output_dir=config.output_dir,
            backbone=config.backbone,
            head=head,
        )

    # -- helpers ------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def _dataset(self, data: Any, transform) -> torch.utils.data.Dataset:
        if isinstance(data, ImageFolderDataset):
            if data.classes != self.classes:
                raise ValueError(f"dataset classes {data.classes} differ from the model's classes {self.classes}")
            return data.with_transform(transform, self.draft_size if transform is self.eval_transform else None)
        return data

    def _forward_module(self) -> nn.Module:
        """The model, or its ``torch.compile`` wrapper (same parameters) with ``config.compile``."""
        if not self.config.compile:
            return self.model
        if self._compiled is None:
            self._compiled = torch.compile(self.model)
        return self._compiled

    def _loader(self, dataset, batch_size: int, shuffle: bool, epoch: int = 0) -> torch.utils.data.DataLoader:
        if isinstance(dataset, torch.utils.data.DataLoader):
            return dataset
        sampler = None
        if shuffle:
            # One permutation (randperm seeded seed + epoch) dealt out rank::world_size. Global
            # batch k then holds the images of batch k of one process with batch_size *
            # world_size, so a torchrun run takes the same steps as one process.
            rank, world = (self.dist.rank, self.dist.world_size) if self.dist else (0, 1)
            sampler = torch.utils.data.DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.config.seed * 100_003, drop_last=True)
            sampler.set_epoch(epoch)
        n = len(sampler) if sampler is not None else len(dataset)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            # Seeds the worker processes only; the sampler owns the order.
            generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch) if shuffle else None,
            drop_last=shuffle and n > batch_size,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            collate_fn=skip_none_collate,  # a file that fails to load costs a sample, not the epoch
        )

    def _eval_loader(self, dataset, batch_size: int | None = None) -> tuple[torch.utils.data.DataLoader, bool]:
        """An evaluation loader, and whether it covers only this rank's shard (then metrics are reduced)."""
        batch_size = batch_size or self.eval_batch_size
        if self.dist is None or isinstance(dataset, torch.utils.data.DataLoader):
            return self._loader(dataset, batch_size, shuffle=False), False
        shard = torch.utils.data.Subset(dataset, shard_indices(len(dataset), self.dist.rank, self.dist.world_size))
        return self._loader(shard, batch_size, shuffle=False), True

    def _ddp_wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel (one process: ``module`` itself).

        DDP reduces the gradients of the parameters that require them when it is built, so it
        is rebuilt whenever the trainable set changes (a phase boundary, or the switch between
        cached-feature and full epochs); frozen parameters are never in its buckets.
        """
        if self.dist is None:
            return module
        key = (id(module), frozenset(n for n, p in module.named_parameters() if p.requires_grad))
        if key != self._ddp_key:
            import gc

            from torch.nn.parallel import DistributedDataParallel

            self._ddp = self._ddp_key = None
            gc.collect()  # the old reducer's autograd hooks go with it
            self._ddp = DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.config.find_unused_parameters)
            self._ddp_key = key
        return self._ddp

    def class_weights(self, train: Any) -> torch.Tensor | None:
        """The cross-entropy class weights ``config.class_weights`` asks for, or ``None``.

        ``"balanced"``: ``n / (num_classes * n_c)`` over the training labels (scikit-learn's
        ``compute_class_weight("balanced")``, after King & Zeng 2001); a class without training
        images gets weight 0.

        Args:
            train: the training data; ``"balanced"`` reads its ``targets`` (an
                `ImageFolderDataset`, or any dataset with a ``targets`` list).

        Returns:
            float32 ``(num_classes,)`` on the model's device, or ``None`` for ``"none"``.

        Raises:
            ValueError: a weight list of the wrong length, or ``"balanced"`` on data without
                ``targets``.
        """
        spec = self.config.class_weights
        n_classes = len(self.classes)
        if spec == "none":
            return None
        if isinstance(spec, list):
            if len(spec) != n_classes:
                raise ValueError(f"class_weights has {len(spec)} values but there are {n_classes} classes {self.classes}")
            return torch.tensor(spec, dtype=torch.float32, device=self.device)
        data = train.dataset if isinstance(train, torch.utils.data.DataLoader) else train
        targets = getattr(data, "targets", None)
        if targets is None:
            raise ValueError('class_weights="balanced" needs training data with a `targets` list (an ImageFolderDataset)')
        counts = torch.bincount(torch.as_tensor(list(targets)), minlength=n_classes).double()
        weights = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp_min(1)), torch.zeros_like(counts))
        return weights.float().to(self.device)

    def _new_optimizer(self, epoch: int, lr: float) -> torch.optim.Optimizer:
        """``config.optimizer`` over the policy's parameter groups at ``epoch``, head LR ``lr``."""
        cfg = self.config
        groups = self.policy.param_groups(self.model, epoch, lr, cfg.weight_decay)
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def _build_optimizer(self, epoch: int) -> None:
        self.optimizer = self._new_optimizer(epoch, self.config.lr)

    @property
    def trainable_parameters(self) -> int:
        """Number of scalar parameters with ``requires_grad``."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # -- training -----------------------------------------------------------------------------
    @property
    def _progress(self) -> bool:
        return self.config.progress and self.is_main

    def _cpu_flags(self):
        return flush_denormal(self.config.flush_denormal and self.device.type == "cpu")

    def fit(
        self,
        train: Any,
        val: Any = None,
        *,
        resume: bool | str | Path = False,
    ) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs, evaluating on ``val`` after each.

        At the start of every epoch the `FreezePolicy` is applied; at a phase boundary
        newly unfrozen parameters join the optimizer with their own learning rate while the
        others keep their state. The learning rate follows a linear warm-up then cosine decay,
        per optimizer step. With ``output_dir`` set, each epoch writes ``last.state.pt`` (the
        resume state, weights included, one atomic file) first, then ``last.safetensors``,
        ``best.safetensors`` when ``config.best_metric`` improves, and ``metrics.jsonl``.

        Before anything else, every `ImageFolderDataset` not scanned yet is scanned
        (`ImageFolderDataset.scan`): with ``bad_images="skip"`` unusable files are dropped and
        the report is printed to stderr, with ``"error"`` the scan raises before training.

        Args:
            train: an `ImageFolderDataset` (the training transform is applied), or a
                dataset yielding ``(float32 tensor (3, H, W), int label)``.
            val: the same kinds, evaluated with the eval transform; ``None`` skips validation.
            resume: ``True`` to continue from ``output_dir/last.state.pt`` (when the folder holds
                no run files at all, as after a crash in the first epoch, training starts at
                epoch 0), or a path to a ``.state.pt`` file.

        Returns:
            One dict per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``top1``,
            ``macro_f1``, ``per_class_recall``, ``confusion_matrix``, ``lr``,
            ``trainable_params``, ``seconds``, ``images_per_s``, ``cached_features`` (whether
            the epoch trained from cached features; see ``TrainConfig.feature_cache``).

        Raises:
            ValueError: the policy leaves nothing trainable, or the classes do not match.
            BadImageError: a dataset with ``bad_images="error"`` holds unusable files (lists them).
            FloatingPointError: the loss became NaN or infinite (names epoch and step). The
                failing step is not taken (BatchNorm statistics are restored too), and the files
                of the last completed epoch are left as they were.
            CheckpointError: the resume state is missing, truncated, corrupted or does not fit.
        """
        with self._cpu_flags():
            return self._fit(train, val, resume)

    def _fit(self, train: Any, val: Any, resume: bool | str | Path) -> list[dict[str, Any]]:
        cfg = self.config
        for data in (train, val):
            if isinstance(data, ImageFolderDataset) and data.scan_report is None:
                report = data.scan()
                if (report.bad or report.ignored) and self.is_main:
                    tqdm.write(report.summary(), file=sys.stderr)
        if self.dist is not None:
            self._prepare_distributed()
        train_ds = self._dataset(train, self.train_transform)
        val_ds = self._dataset(val, self.eval_transform) if val is not None else None
        n_train = len(train_ds.dataset) if isinstance(train_ds, torch.utils.data.DataLoader) else len(train_ds)
        # Per process: the distributed sampler deals n_train // world_size images to each rank.
        n_local = n_train // self.dist.world_size if self.dist and not isinstance(
            train_ds, torch.utils.data.DataLoader) else n_train
        drop_last = n_local > cfg.batch_size
        steps_per_epoch = n_local // cfg.batch_size if drop_last else math.ceil(n_local / cfg.batch_size)
        total_steps = cfg.epochs * steps_per_epoch
        warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        mixup = None
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
            from timm.data import Mixup

            # timm's Mixup smooths the mixed targets itself, so the loss must not smooth again.
            mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mixup_prob,
                          label_smoothing=cfg.label_smoothing, num_classes=len(self.classes))
        criterion = nn.CrossEntropyLoss(weight=self.class_weights(train),
                                        label_smoothing=0.0 if mixup else cfg.label_smoothing)
        _seed_everything(cfg.seed + (self.dist.rank if self.dist else 0))  # as timm: seed + rank
        # Fail before any work if the policy is unusable at any phase.
        for e in [0, *self.policy.boundaries()]:
            self.policy.trainable_names(self.model, e)

        use_cache = (
            cfg.feature_cache and mixup is None and isinstance(train, ImageFolderDataset)
            and classifier_is_last_step(self.model, self._to_device(
                torch.stack([self.eval_transform(load_image(train.samples[0][0]))])))
        )
        head_names = set(classifier_param_names(self.model))

        start_epoch = 0
        self.policy.apply(self.model, 0)
        self._build_optimizer(0)
        self.step, self.best, self.history = 0, {"metric": None, "epoch": None}, []
        self.ema = None
        if cfg.ema_decay is not None:
            from timm.utils import ModelEmaV3

            # Warm-up (decay 1 - (1 + step)^-3/4, capped at ema_decay): short fine-tunes have few
            # steps, and a fixed 0.999 would keep the average near the pretrained weights.
            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=True, warmup_power=0.75)
        if resume:
            start_epoch = self._resume(resume)
        if self.history and self.history[-1].get("early_stop"):
            start_epoch = cfg.epochs  # the resumed run had already stopped early

        for epoch in range(start_epoch, cfg.epochs):
            self.epoch = epoch
            trainable = self.policy.apply(self.model, epoch)
            if epoch in self.policy.boundaries():
                before = len(self.optimizer.param_groups)
                self.policy.sync_optimizer(self.optimizer, self.model, epoch, cfg.lr, cfg.weight_decay)
                for g in self.optimizer.param_groups[before:]:
                    g["joined_step"] = self.step  # saved with the optimizer state, so resume keeps it
            self.model.train()
            t0 = time.perf_counter()  # includes feature extraction on a cache miss
            cached = use_cache and trainable <= head_names
            if cached:
                view = epoch % cfg.feature_views if cfg.feature_views else None
                forward = self._ddp_wrap(self.model.get_classifier())
                loader = self._loader(torch.utils.data.TensorDataset(*self.cached_features(train, view)),
                                      cfg.batch_size, shuffle=True, epoch=epoch)
            else:
                forward = self._ddp_wrap(self._forward_module())
                loader = self._loader(train_ds, cfg.batch_size, shuffle=True, epoch=epoch)
            total_loss, seen = 0.0, 0
            running_stats = _running_stats(self.model)
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not self._progress)
            for batch in bar:
                if batch is None:  # every file of the batch failed to load (bad_images="skip")
                    continue
                x, y = batch
                factor = cosine_lr_factor(self.step, total_steps, warmup_steps, cfg.min_lr_ratio)
                for g in self.optimizer.param_groups:
                    g["lr"] = cfg.lr * g["lr_scale"] * factor * self._join_ramp(g, steps_per_epoch)
                x, y = self._to_device(x), y.to(self.device)
                target = y
                if mixup is not None and x.shape[0] % 2 == 0:
                    x, target = mixup(x, y)  # soft targets (B, num_classes)
                # The forward pass updates BatchNorm statistics even when the loss turns out
                # NaN; keep a copy so a failing step leaves the model as it was.
                stats_before = [t.clone() for t in running_stats]
                with self._autocast():
                    logits = forward(x)
                loss = criterion(logits.float(), target)
                finite = bool(torch.isfinite(loss))
                if self.dist is not None:  # every rank stops together, none waits in a reduction
                    finite = bool(all_reduce_sum(0.0 if finite else 1.0)[0] == 0)
                if not finite:
                    with torch.no_grad():
                        for t, saved in zip(running_stats, stats_before):
                            t.copy_(saved)
                    raise FloatingPointError(
                        f"loss is {loss.item()} at epoch {epoch} step {self.step}; the last good "
                        f"checkpoint is kept{' in ' + str(self.output_dir) if self.output_dir else ''}"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.unscale_(self.optimizer)
                else:
                    loss.backward()
                if cfg.grad_clip_norm:
                    nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip_norm)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.model, step=self.step)
                total_loss += loss.item() * y.shape[0]
                seen += y.shape[0]
                bar.set_postfix(loss=f"{total_loss / seen:.4f}")
            seconds = time.perf_counter() - t0
            if self.dist is not None:  # sums over ranks: the loss of every image, not a mean of means
                total_loss, seen = (float(v) for v in all_reduce_sum(total_loss, seen))
                seen = int(seen)
            record: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": total_loss / max(seen, 1),
                "lr": cfg.lr * cosine_lr_factor(max(self.step - 1, 0), total_steps, warmup_steps, cfg.min_lr_ratio),
                "trainable_params": self.trainable_parameters,
                "seconds": seconds,
                "images_per_s": seen / seconds if seconds > 0 else None,
                "cached_features": cached,
            }
            if val_ds is not None:
                judged = self.ema.module if self.ema is not None else self.model
                if cached and isinstance(val, ImageFolderDataset):
                    m = self._evaluate_loader(*self._eval_loader(torch.utils.data.TensorDataset(
                        *self.cached_features(val, None))), forward=judged.get_classifier())
                else:
                    m = self._evaluate_loader(*self._eval_loader(val_ds),
                                              forward=judged if self.ema is not None else self._forward_module())
                record.update(val_loss=m.loss, top1=m.top1, macro_f1=m.macro_f1,
                              per_class_recall=m.per_class_recall, confusion_matrix=m.matrix.tolist())
            self.history.append(record)
            improved = self._is_improvement(record)
            if improved:
                self.best = {"metric": record[self._best_key], "epoch": epoch}
            stop = self._early_stop(epoch) if val_ds is not None else False
            if stop:
                record["early_stop"] = True
            if self._progress:
                tqdm.write(self._summary(record, improved))
            rng = [_rng_state()] if self.dist is None else all_gather_object(_rng_state())
            if self.is_main:
                self._write_epoch(record, improved, rng)
            barrier()  # the epoch's files exist before any rank goes on
            if stop:
                if self._progress:
                    tqdm.write(f"early stop: no better {self._best_key} for {cfg.early_stopping_patience} epoch(s)")
                break
        self.epoch = self.history[-1]["epoch"] + 1 if self.history else cfg.epochs
        if self.ema is not None:
            self.model.load_state_dict(self.ema.module.state_dict())
        if self.output_dir is not None and self.history and self.is_main:
            from tlkit.report import write_run_report

            facts: dict[str, Any] = {"train_images": n_train}
            if val_ds is not None:
                facts["val_images"] = len(val_ds.dataset) if isinstance(val_ds, torch.utils.data.DataLoader) else len(val_ds)
            if isinstance(train, ImageFolderDataset):
                facts["root"] = str(train.root)
            write_run_report(self, self.output_dir, facts)
        barrier()
        return self.history

    def _prepare_distributed(self) -> None:
        cfg = self.config
        if cfg.compile:
            raise ValueError("compile=True is not supported under DDP yet; set compile=False for torchrun runs")
        if cfg.sync_batchnorm and not any(isinstance(m, nn.SyncBatchNorm) for m in self.model.modules()):
            if self.device.type != "cuda":
                raise ValueError(f"sync_batchnorm needs CUDA: torch's SyncBatchNorm has no {self.device.type} kernel")
            from timm.layers import convert_sync_batchnorm

            self.model = convert_sync_batchnorm(self.model)

    def _join_ramp(self, group: dict[str, Any], steps_per_epoch: int) -> float:
        """LR factor of a group that joined at a phase boundary: linear from 0 to 1 over
        ``config.unfreeze_warmup_epochs``; 1 for groups trained from the start."""
        span = round(self.config.unfreeze_warmup_epochs * steps_per_epoch)
        if span <= 0 or "joined_step" not in group:
            return 1.0
        return min(1.0, (self.step - group["joined_step"] + 1) / (span + 1))

    def _early_stop(self, epoch: int) -> bool:
        patience = self.config.early_stopping_patience
        if patience is None:
            return False
        # Epochs since the last improvement, counted from the latest phase boundary: a newly
        # unfrozen phase gets its own patience.
        since = max([b for b in self.policy.boundaries() if b <= epoch], default=0)
        best_epoch = self.best["epoch"] if self.best["epoch"] is not None else -1
        return epoch - max(best_epoch, since - 1) >= patience

    @property
    def _best_key(self) -> str:
        return self.config.best_metric

    def _is_improvement(self, record: dict[str, Any]) -> bool:
        value = record.get(self._best_key)
        if value is None:
            return False
        best = self.best["metric"]
        if best is None:
            return True
        return value < best if self._best_key in _LOWER_IS_BETTER else value > best

    def _summary(self, r: dict[str, Any], improved: bool) -> str:
        s = f"epoch {r['epoch'] + 1}/{self.config.epochs}  train_loss {r['train_loss']:.4f}"
        if "top1" in r:
            s += f"  val_loss {r['val_loss']:.4f}  top1 {r['top1']:.4f}  macro_f1 {r['macro_f1']:.4f}"
        s += f"  trainable {r['trainable_params']:,}  {r['seconds']:.1f}s"
        return s + ("  *best*" if improved else "")

    def _write_epoch(self, record: dict[str, Any], improved: bool, rng: list[dict[str, Any]]) -> None:
        """Write the resume state and run files; ``rng`` holds every rank's RNG state, rank order."""
        if self.output_dir is None:
            return
        # The resume state is one atomic file that holds the weights too, written before
        # anything else: a kill between any two of these writes leaves a consistent snapshot.
        save_training_state(self.output_dir / "last.state.pt", {
            "epoch": record["epoch"] + 1,
            "step": self.step,
            "model": {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng[0],
            "rng_per_rank": rng,
            "best": self.best,
            "history": json.dumps(self.history),
            "weights_digest": _digest(self.model),
            "ema": ({k: v.detach().to("cpu") for k, v in self.ema.module.state_dict().items()}
                    if self.ema is not None else None),
        })
        self._write_run_files(best=improved)

    def _write_run_files(self, best: bool) -> None:
        """``last.safetensors``, ``best.safetensors`` (if ``best``) and ``metrics.jsonl`` from the current state."""
        out = self.output_dir
        record = self.history[-1]
        metrics = {k: record.get(k) for k in ("epoch", "top1", "macro_f1", "val_loss", "train_loss", "per_class_recall")}
        weights = (self.ema.module if self.ema is not None else self.model).state_dict()
        meta = self.metadata(metrics)
        save_checkpoint(out / "last.safetensors", weights, meta)
        if best:
            save_checkpoint(out / "best.safetensors", weights, meta)
        lines = "".join(json.dumps(r) + "\n" for r in self.history)
        atomic_write_bytes(out / "metrics.jsonl", lines.encode())

    def _resume(self, resume: bool | str | Path) -> int:
        if self.output_dir is not None and self.is_main:
            # A run killed halfway through an atomic write leaves its temporary file behind.
            for name in _RUN_FILES:
                for tmp in self.output_dir.glob(f".{name}.tmp-*"):
                    tmp.unlink(missing_ok=True)
        if resume is True:
            if self.output_dir is None:
                raise ValueError("resume=True needs output_dir; pass the path of a .state.pt file instead")
            state_path = self.output_dir / "last.state.pt"
            if not any((self.output_dir / n).exists() for n in _RUN_FILES):
                # Killed before the first epoch ended: there is nothing to resume, start over.
                if self.is_main:
                    tqdm.write(f"resume: {self.output_dir} holds no run files yet; starting at epoch 0", file=sys.stderr)
                return 0
        else:
            state_path = Path(resume)
        state = load_training_state(state_path)
        if "model" in state:
            weights_path = state_path
            self._load_weights(state["model"], state_path)
        else:  # written by tlkit 0.1.0: weights in the .safetensors file beside the state
            weights_path = state_path.with_name(state_path.name.replace(".state.pt", ".safetensors"))
            weights, _ = load_checkpoint(weights_path)
            self._load_weights(weights, weights_path)
        if _digest(self.model) != state["weights_digest"]:
            raise CheckpointError(
                f"{weights_path}: weights do not match the digest recorded in {state_path} "
                "(corrupted, or from another epoch)"
            )
        next_epoch = int(state["epoch"])
        # Replay the phase boundaries already passed so the optimizer's groups are the ones the
        # uninterrupted run had, in the same order; then restore their state.
        cfg = self.config
        for b in self.policy.boundaries():
            if b < next_epoch:
                self.policy.apply(self.model, b)
                self.policy.sync_optimizer(self.optimizer, self.model, b, cfg.lr, cfg.weight_decay)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{state_path}: optimizer state does not fit this policy ({e})") from e
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise CheckpointError(f"{state_path}: holds no EMA weights but config.ema_decay is set")
            try:
                self.ema.module.load_state_dict(state["ema"])
            except RuntimeError as e:
                raise CheckpointError(f"{state_path}: EMA weights do not fit this model ({e})") from e
        self.step = int(state["step"])
        self.best = state["best"]
        self.history = json.loads(state["history"])
        # Each rank continues its own RNG stream when the world size is unchanged; otherwise
        # every rank takes rank 0's.
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        rank, world = (self.dist.rank, self.dist.world_size) if self.dist else (0, 1)
        _set_rng_state(per_rank[rank] if len(per_rank) == world else state["rng"])
        if self.output_dir is not None and self.history and self.is_main:
            # A kill may have come after the state but before the files written after it:
            # write them again from the state.
            self.epoch = next_epoch - 1
            self._write_run_files(best=self.best.get("epoch") == next_epoch - 1)
        return next_epoch

    # -- evaluation and prediction ------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: Any, batch_size: int | None = None, *, tta: str = "none") -> ClassificationMetrics:
        """Top-1, per-class recall, macro-F1, confusion matrix and mean loss on ``data``.

        Args:
            data: an `ImageFolderDataset` with the model's classes (evaluated with the eval
                transform), a dataset of ``(tensor (3, H, W), label)``, or a DataLoader.
            batch_size: default `eval_batch_size`.
            tta: test-time augmentation, one of ``"none"``, ``"hflip"``, ``"multi-crop"``
                (see `tlkit.tta`); the loss is then the NLL of the averaged probabilities.

        Under DDP each rank evaluates its shard of a dataset and the counts are summed, so every
        rank returns the metrics of the whole data (a DataLoader is evaluated whole on each rank).

        Raises:
            ValueError: empty data, or an unknown ``tta`` mode.
        """
        dataset = self._dataset(data, self.eval_transform)
        with self._cpu_flags():
            return self._evaluate_loader(*self._eval_loader(dataset, batch_size), forward=self._forward_module(), tta=tta)

    def lr_find(
        self,
        train: Any,
        *,
        start_lr: float = 1e-7,
        end_lr: float = 10.0,
        num_steps: int = 100,
        epoch: int = 0,
        diverge: float = 4.0,
        smoothing: float = 0.98,
    ) -> LRFinderResult:
        """Learning-rate range test (Smith, 2017; fastai's ``lr_find``), then restore the model.

        Trains the parameters the freeze policy trains at ``epoch``, with that phase's
        per-group LR scales (layer-wise decay included), on augmented training batches, while
        the head group's LR grows exponentially from ``start_lr`` to ``end_lr``. Weights,
        BatchNorm statistics and random state are put back afterwards; the loop's own
        optimizer is untouched. Plot the result with `LRFinderResult.plot`.

        Args:
            train: the training data (as for `fit`).
            start_lr: first learning rate of the head group.
            end_lr: last learning rate of the head group.
            num_steps: mini-batches in the sweep (the data is cycled if shorter).
            epoch: which phase of the policy to test (e.g. the epoch after an unfreeze).
            diverge: stop when the smoothed loss exceeds this multiple of its minimum.
            smoothing: EMA coefficient of the smoothed loss (fastai's 0.98).

        Returns:
            `LRFinderResult` with the learning rates, losses and the steepest-descent suggestion.

        Raises:
            ValueError: ``start_lr`` not below ``end_lr``, fewer than 2 steps, or empty data.
            RuntimeError: called under DDP (the range test runs in one process).
        """
        if not 0 < start_lr < end_lr:
            raise ValueError(f"need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
        if num_steps < 2:
            raise ValueError(f"num_steps must be at least 2, got {num_steps}")
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        grads = {n: p.requires_grad for n, p in self.model.named_parameters()}
        rng, was_training = _rng_state(), self.model.training
        try:
            with self._cpu_flags():
                return self._lr_find(train, start_lr, end_lr, num_steps, epoch, diverge, smoothing)
        finally:
            self.model.load_state_dict(saved)
            for n, prm in self.model.named_parameters():
                prm.requires_grad_(grads[n])
                prm.grad = None
            _set_rng_state(rng)
            self.model.train(was_training)

    def _lr_find(self, train, start_lr, end_lr, num_steps, epoch, diverge, smoothing) -> LRFinderResult:
        cfg = self.config
        if self.dist is not None:
            raise RuntimeError("lr_find runs in one process: start it without torchrun (or with distributed='off')")
        self.policy.apply(self.model, epoch)
        opt = self._new_optimizer(epoch, start_lr)
        criterion = nn.CrossEntropyLoss(weight=self.class_weights(train), label_smoothing=cfg.label_smoothing)
        dataset = self._dataset(train, self.train_transform)
        growth = (end_lr / start_lr) ** (1 / (num_steps - 1))
        result = LRFinderResult(lrs=[], losses=[])
        avg, best, step = 0.0, math.inf, 0
        self.model.train()
        bar = tqdm(total=num_steps, desc="lr_find", leave=False, disable=not self._progress)
        while step < num_steps and not result.diverged:
            batches = 0
            for batch in self._loader(dataset, cfg.batch_size, shuffle=True, epoch=step):
                if batch is None:
                    continue
                batches += 1
                lr = start_lr * growth**step
                for g in opt.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                x, y = batch
                with self._autocast():
                    logits = self.model(self._to_device(x))
                loss = criterion(logits.float(), y.to(self.device))
                if not torch.isfinite(loss):
                    result.diverged = True
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                avg = smoothing * avg + (1 - smoothing) * loss.item()
                smooth = avg / (1 - smoothing ** (step + 1))  # bias correction, as fastai
                result.lrs.append(lr)
                result.raw_losses.append(loss.item())
                result.losses.append(smooth)
                best = min(best, smooth)
                step += 1
                bar.update()
                if step > 1 and smooth > diverge * best:
                    result.diverged = True
                    break
                if step >= num_steps:
                    break
            if batches == 0:
                raise ValueError("lr_find: the training data gave no batch")
        bar.close()
        result.suggestion = LRFinderResult.steepest(result.lrs, result.losses)
        return result

    @torch.no_grad()
    def _evaluate_loader(self, loader, sharded: bool = False, *, forward: nn.Module, tta: str = "none") -> ClassificationMetrics:
        was_training = self.model.training
        self.model.eval()
        preds, targets, loss_sum = [], [], 0.0
        for batch in tqdm(loader, desc="evaluate", leave=False, disable=not self._progress):
            if batch is None:
                continue
            x, y = batch
            y = y.to(self.device)
            with self._autocast():
                if tta == "none":
                    logits = forward(self._to_device(x)).float()
                    loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
                else:
                    logits = tta_log_probs(forward, self._to_device(x), tta)
                    loss_sum += nn.functional.nll_loss(logits, y, reduction="sum").item()
            preds.append(logits.argmax(1).cpu())
            targets.append(y.cpu())
        self.model.train(was_training)
        t = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
        p = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
        m = ClassificationMetrics.from_predictions(t, p, self.classes)
        if sharded:  # counts summed over ranks: exactly the one-process metrics
            matrix, loss_sum = all_reduce_sum(m.matrix, loss_sum)
            m = ClassificationMetrics(self.classes, matrix.round().long(), None)
            loss_sum = float(loss_sum)
        if m.n == 0:
            raise ValueError("evaluation data is empty")
        m.loss = loss_sum / m.n
        return m

    def cached_features(self, data: ImageFolderDataset, view: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled pre-logit features of ``data`` from the feature cache, computed on a miss.

        Args:
            data: the images (their paths, sizes and modification times are part of the key).
            view: ``None`` for the eval transform, else the index of a seeded augmented view made
                with the training transform.

        Returns:
            ``(features, labels)``: float32 ``(N, num_features)`` and int64 ``(N,)``, CPU.
        """
        if view is None:
            transform, desc, ctx = self.eval_transform, f"eval|{self.eval_transform!r}|draft={self.draft_size}", None
        else:
            seed = self.config.seed * 1_000_003 + view
            transform, desc, ctx = self.train_transform, f"train|{self.train_transform!r}|view={view}|seed={seed}", seeded(seed)
        head = tuple(f"{n}." for n in classifier_module_names(self.model))
        key = FeatureCache.key(
            {"name": self.backbone.name, "model_kwargs": self.backbone.model_kwargs},
            weights_digest(self.model, exclude=head), self.data_config, desc, data.samples,
        )

        def compute():
            dataset = self._dataset(data, transform)
            loader, sharded = self._eval_loader(dataset)  # under DDP each rank extracts its shard
            bar = (lambda it: tqdm(it, desc="features", leave=False)) if self._progress else None
            with ctx() if ctx else contextlib.nullcontext():
                features = extract_features(self.model, loader, self._to_device, self._autocast, bar)
            return gather_shards(features, len(dataset)) if sharded else features

        if self.dist is None:
            return self.feature_cache.get_or_compute(key, compute)
        # Rank 0 decides hit or miss (and sends what it read) so all ranks take the same path,
        # even when their disks differ; only rank 0 writes the cache file.
        found = self.feature_cache.lookup(key, disk=False)  # memory is the same on every rank
        if found is not None:
            return found
        found = broadcast_object(self.feature_cache.lookup(key) if self.is_main else None)
        if found is not None:
            self.feature_cache.store(key, found, write=False)
            return found
        self.feature_cache.misses += 1
        value = compute()
        self.feature_cache.store(key, value, write=self.is_main)
        return value

    def _prepare(self, item: Any, max_pixels: int | None, max_bytes: int | None) -> torch.Tensor:
        if isinstance(item, (str, Path)):
            return self.eval_transform(load_image(item, max_pixels=max_pixels, max_bytes=max_bytes,
                                                  draft_size=self.draft_size))
        if isinstance(item, Image.Image):
            return self.eval_transform(to_rgb(item))
        if isinstance(item, torch.Tensor) and item.ndim == 3:
            return item
        raise TypeError(f"cannot predict on {type(item).__name__}: pass paths, PIL images or (3, H, W) / (B, 3, H, W) tensors")

    @torch.no_grad()
    def predict(
        self,
        inputs: Any,
        batch_size: int | None = None,
        *,
        max_pixels: int | None = MAX_PIXELS,
        max_bytes: int | None = MAX_BYTES,
        tta: str = "none",
    ) -> list[Prediction]:
        """Classify images with the saved data config's eval transform (never augmentation).

        Files are treated as untrusted: each is checked against ``max_bytes`` and, from its
        header, ``max_pixels`` before it is decoded (see `tlkit.load_image`).

        Args:
            inputs: a path, a PIL image, a tensor, or a list of them. Tensors are taken as model
                input: float32 ``(3, H, W)`` or ``(B, 3, H, W)``, already normalised. PIL images
                with transparency are composited onto white, as files are.
            batch_size: images per forward pass; default `eval_batch_size`.
            max_pixels: largest accepted width x height of an image file.
            max_bytes: largest accepted size of an image file, in bytes.
            tta: test-time augmentation: ``"none"``, ``"hflip"`` or ``"multi-crop"`` (see
                `tlkit.tta`); probabilities are then averaged over the views.

        Returns:
            One `Prediction` per image, in input order.

        Raises:
            BadImageError: (a ``ValueError``) an image file is unreadable, truncated, or over a
                limit (names it and the limit).
            TypeError: an input of an unsupported type.
            ValueError: an unknown ``tta`` mode.
        """
        check_tta_mode(tta)  # before decoding anything
        if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
            items: list[Any] = list(inputs)
        elif isinstance(inputs, (list, tuple)):
            items = list(inputs)
        else:
            items = [inputs]
        batch_size = batch_size or self.eval_batch_size
        with self._cpu_flags():
            return self._predict(items, batch_size, max_pixels, max_bytes, tta)

    def _predict(
        self, items: list[Any], batch_size: int, max_pixels: int | None, max_bytes: int | None, tta: str = "none"
    ) -> list[Prediction]:
        from concurrent.futures import ThreadPoolExecutor

        was_training = self.model.training
        self.model.eval()
        out: list[Prediction] = []
        chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

        def prepare(chunk: list[Any]) -> torch.Tensor:
            return torch.stack([self._prepare(it, max_pixels, max_bytes) for it in chunk])

        # Decode the next batch in a thread while the model runs on this one (PIL's decoders
        # and resize release the GIL); an unreadable file raises from result(), in order.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(prepare, chunks[0]) if chunks else None
            for k in tqdm(range(len(chunks)), desc="predict", unit="batch", leave=False,
                          disable=not self._progress or len(chunks) < 2):
                x = pending.result()
                if k + 1 < len(chunks):
                    pending = pool.submit(prepare, chunks[k + 1])
                out += self._classify(x, tta)
        self.model.train(was_training)
        return out

    def _classify(self, x: torch.Tensor, tta: str) -> list[Prediction]:
        out: list[Prediction] = []
        with self._autocast():
            if tta == "none":
                probs = self.model(self._to_device(x)).float().softmax(1).cpu()
            else:
                probs = tta_log_probs(self.model, self._to_device(x), tta).exp().cpu()
        for row in probs:
            k = int(row.argmax())
            out.append(Prediction(self.classes[k], k, float(row[k]), {c: float(v) for c, v in zip(self.classes, row)}))
        return out

    # -- persistence --------------------------------------------------------------------------
    def metadata(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON stored in every checkpoint's header.

        Warns (``UserWarning``) when `load` would refuse it, e.g. ``model_kwargs`` outside the
        allow-list a checkpoint may carry (`tlkit._header.MODEL_KWARGS`).
        """
        from tlkit import __version__

        if self.backbone.weights is not None:
            source = f"file:{Path(self.backbone.weights).name}"
        else:
            source = "hub" if self.backbone.pretrained else "random"
        meta = {
            "tlkit_version": __version__,
            "backbone": {"name": self.backbone.name, "model_kwargs": self.backbone.model_kwargs, "weights_source": source},
            "head": self.head.model_dump(mode="json"),
            "classes": self.classes,
            "data_config": self.data_config,
            "freeze_policy": self.policy.model_dump(mode="json"),
            "train_config": self.config.model_dump(mode="json"),
            "augment": self.augment.model_dump(mode="json"),
            "epoch": self.epoch,
            "metrics": metrics or {},
        }
        problem = unloadable_reason(meta)
        if problem is not None:  # say so when the file is written, not when someone needs to load it
            warnings.warn(f"FineTuner.load will refuse this checkpoint: {problem}", stacklevel=2)
        return meta

    def save(self, path: str | Path, metrics: dict[str, Any] | None = None) -> Path:
        """Write the model and its metadata to a ``.safetensors`` checkpoint, atomically."""
        return save_checkpoint(path, self.model.state_dict(), self.metadata(metrics))

    def _load_weights(self, state: dict[str, torch.Tensor], path: Path, skip_head: bool = False) -> None:
        """Load ``state`` into the model; with ``skip_head`` the classifier keeps its initialisation.

        Raises:
            CheckpointError: a tensor is missing, unexpected or of another shape (names the first
                ones, in model order, and the file).
        """
        own = self.model.state_dict()
        if skip_head:
            head = tuple(f"{n}." for n in classifier_module_names(self.model))
            own = {k: v for k, v in own.items() if not k.startswith(head)}
            state = {k: v for k, v in state.items() if not k.startswith(head)}
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
                  if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise CheckpointError(
                f"{path}: does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"shape mismatches (file vs model) {shapes[:3]}"
            )
        self.model.load_state_dict(state, strict=not skip_head)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        *,
        classes: Sequence[str] | None = None,
        num_classes: int | None = None,
        adapt_head: bool = False,
        **config_overrides: Any,
    ) -> FineTuner:
        """Rebuild a ready model from a checkpoint file or a run folder (its best checkpoint).

        Needs no config file, no user code and no network: the backbone is built with
        ``pretrained=False`` from the stored name and kwargs, then the stored weights are loaded.

        The file may come from someone else. Its header must pass a strict schema first (a timm
        model name, only allow-listed bounded timm kwargs, unique printable class names, a
        bounded data config), the model it describes is built on the ``meta`` device and must
        have exactly the file's tensors before any real memory is allocated, and resource
        settings (``num_workers``, ``device``, ``eval_batch_size``, ``compile``, caches, process
        groups) come from this call, never from the file. See "Threat model" in the
        reliability docs.

        To reuse a checkpoint for other classes (a new task from a fine-tuned backbone), pass
        ``classes`` (or ``num_classes``) with ``adapt_head=True``: the backbone weights are
        loaded and a new head of the stored head config is initialised for the new classes
        (PyTorch's default initialisation, seeded by the stored ``TrainConfig.seed`` so two
        loads agree). The head is never adapted silently.

        Args:
            path: a ``.safetensors`` checkpoint, or a run folder.
            device: where to put the model.
            classes: class names in index order; default the checkpoint's.
            num_classes: a class count instead of ``classes`` (names ``"0"``, ``"1"``... unless it
                equals the checkpoint's count, which keeps the stored names).
            adapt_head: allow ``classes`` / ``num_classes`` to differ from the checkpoint's.
            config_overrides: fields of `TrainConfig` to change (e.g. ``progress=False``); the
                resource fields (`tlkit._header.RUNTIME_FIELDS`) not given here take their
                defaults, whatever the file says.

        Raises:
            CheckpointError: missing, corrupted or edited file; a header field that fails the
                schema (names the file and the field); other classes without ``adapt_head``;
                backbone weights that do not fit the stored backbone (always, naming the first
                mismatching tensors).
            ValueError: ``classes`` and ``num_classes`` disagree, or an invalid
                ``config_overrides`` value (a pydantic ``ValidationError``).
        """
        path = resolve_checkpoint(path)
        state, meta = load_checkpoint(path)
        # The file may come from a stranger: nothing is built from the header before it passed
        # the schema and before the model it describes was checked against the file's tensors.
        header = parse_header(meta, path)
        check_header_fits_weights(header, state, path)
        backbone = header.backbone.to_config()
        head = header.head
        stored = list(header.classes)
        train_cfg = runtime_train_config(header.train_config, device=device, **config_overrides)
        policy = header.freeze_policy
        augment = header.augment
        if classes is not None:
            wanted = list(classes)
            if num_classes is not None and num_classes != len(wanted):
                raise ValueError(f"num_classes={num_classes} but {len(wanted)} classes were given: {wanted}")
        elif num_classes is not None:
            wanted = stored if num_classes == len(stored) else [str(i) for i in range(num_classes)]
        else:
            wanted = stored
        new_head = wanted != stored
        if new_head and not adapt_head:
            raise CheckpointError(
                f"{path}: the checkpoint's head predicts {len(stored)} classes {stored}, not the {len(wanted)} "
                f"asked for {wanted}; pass adapt_head=True to load the backbone and initialise a new head"
            )
        if new_head:
            head = head.model_copy(update={"num_classes": len(wanted)})
        model = create_backbone(backbone)
        with seeded(train_cfg.seed)():  # a new head is initialised the same way on every load
            HeadReplacer.from_config(head).apply(model)
        tuner = cls(model, wanted, policy=policy, config=train_cfg, data_config=header.data_config_dict(),
                    augment=augment, backbone=backbone, head=head)
        tuner._load_weights(state, path, skip_head=new_head)
        tuner.epoch = 0 if new_head else header.epoch
        tuner.checkpoint_metadata = meta
        tuner.model.eval()
        return tuner


def _running_stats(model: nn.Module) -> list[torch.Tensor]:
    """The BatchNorm buffers a training forward pass changes (running mean, variance, count)."""
    return [t for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]


def _digest(model: nn.Module) -> str:
    """A cheap fingerprint of the weights (sum and sum of squares per tensor, 12 digits)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        v = v.detach().double()
        h.update(f"{k}:{v.sum().item():.12e}:{(v * v).sum().item():.12e};".encode())
    return h.hexdigest()[:16]
