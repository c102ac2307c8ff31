"""`FineTuner`: the façade over the training core: fit, evaluate, predict, lr_find, save, load.

Each method is a few lines that delegate to `tlkit._training` (runtime, loaders, optimizer,
train step, fit loop, state, inference) and `tlkit.callbacks`; new loop behaviour belongs
there or in a callback, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from tlkit._introspect import classifier_module_names
from tlkit._training import state as run_state
from tlkit._training.cached import cached_features
from tlkit._training.ddp import DDPWrapper, prepare_model_for_ddp
from tlkit._training.defaults import default_callbacks
from tlkit._training.guard import claim_run_folder, run_guard
from tlkit._training.inference import Prediction, error_handler, evaluate_loader, predict_batches, predict_items
from tlkit._training.loaders import eval_loader, prepare_dataset
from tlkit._training.loading import choose_classes, read_header
from tlkit._training.loop import FitLoop
from tlkit._training.lr_find import run_lr_find
from tlkit._training.optim import class_weights
from tlkit._training.rng import seeded
from tlkit._training.workers import worker_init_fn
from tlkit._training.runtime import (Runtime, flush_denormal, make_grad_scaler, resolve_device,
                                     resolve_precision)
from tlkit.backbone import DATA_CONFIG_KEYS, create_backbone, resolve_backbone, resolve_data_config
from tlkit.callbacks import Callback
from tlkit.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from tlkit.config import AugmentConfig, BackboneConfig, HeadConfig, RunConfig, TrainConfig
from tlkit.data import ImageFolderDataset, create_transforms, eval_resize_size
from tlkit.distributed import DistributedContext, init_distributed
from tlkit.features import FeatureCache
from tlkit.freeze import FreezePolicy
from tlkit.head import HeadReplacer, TaskHead, check_head_width
from tlkit.images import MAX_BYTES, MAX_PIXELS, load_image, to_rgb
from tlkit.lr_finder import LRFinderResult
from tlkit.metrics import ClassificationMetrics
from tlkit.tta import check_tta_mode

__all__ = ["FineTuner", "Prediction", "flush_denormal", "resolve_device", "resolve_precision"]


def _infer_head_config(model: nn.Module, num_classes: int) -> HeadConfig:
    head = model.get_submodule(classifier_module_names(model)[0])
    if isinstance(head, TaskHead):
        hidden = head.hidden.out_features if hasattr(head, "hidden") else None
        act = next((k for k, v in {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}.items()
                    if hasattr(head, "act") and isinstance(head.act, v)), "relu")
        return HeadConfig(num_classes=num_classes, dropout=head.drop.p, hidden_dim=hidden, activation=act)
    return HeadConfig(num_classes=num_classes)


class FineTuner:
    """Fine-tune a timm model: fit, evaluate, predict, save and load.

    Args:
        model: a timm model whose classifier has already been replaced (see
            `HeadReplacer`); output logits ``(B, len(classes))``.
        classes: class names in index order.
        policy: which parameters train at each epoch; default full fine-tune.
        config: optimisation and loop settings.
        data_config: timm data config (see `tlkit.resolve_data_config`); default from the
            model's ``pretrained_cfg`` with the backbone config's overrides; a partial dict
            (``{"input_size": [3, 160, 160]}``) is completed from the model. Saved in every
            checkpoint and used by `predict`.
        augment: training augmentation.
        output_dir: run folder for checkpoints and ``metrics.jsonl``; ``None`` writes nothing.
        backbone: how the model was built; stored so `load` can rebuild it. Default: the config
            `create_backbone` attached to the model, else its timm architecture name with no
            extra kwargs.
        head: the head's config; default inferred from the model.
        callbacks: `tlkit.callbacks.Callback` objects run by `fit` after the built-in ones
            (progress bar and epoch lines, early stopping, run report, ``TrainConfig.loggers``).
        loss: the training loss, ``loss(logits, target) -> scalar`` with logits float32
            ``(B, num_classes)`` and the dataset's targets (int64 ``(B,)``, or float ``(B, C)``
            multi-hot or mixed); default cross-entropy with ``label_smoothing`` and class weights
            (binary cross-entropy for a multi-label head). Validation keeps its own metrics.

    Use `from_config` to build everything from a `RunConfig`.

    Under ``torchrun`` (``config.distributed="auto"``) the same code trains on every process
    with ``DistributedDataParallel``; see `tlkit.distributed` and the "Distributed training"
    docs page. ``config.batch_size`` is then per process.

    Attributes:
        model: the model, on `device`.
        epoch: completed epochs (0 before `fit`; what every checkpoint header records).
        step: optimizer steps taken.
        best: ``{"metric": value, "epoch": number}`` of the best validated epoch.
        history: one record per completed epoch (see `fit`).
        should_stop: set it to ``True`` from a callback to end `fit` after the current epoch.
        dist: this process's place in the process group, ``None`` in a single process.
        is_main: whether this process writes files and prints (rank 0, or the only process).
        checkpoint_metadata: the header of the checkpoint `load` read (backbone, weights
            source, classes, data config, configs, epoch, ``metrics``); ``None`` otherwise.
        calibration: ``{"temperature", "reject_threshold"}`` fitted on the validation split
            (`tlkit.calibration`), used by `predict`; ``None`` without validation data.
    """

    def __init__(self, model: nn.Module, classes: Sequence[str], *, policy: FreezePolicy | None = None,
                 config: TrainConfig | None = None, data_config: dict[str, Any] | None = None,
                 augment: AugmentConfig | None = None, output_dir: str | Path | None = None,
                 backbone: BackboneConfig | None = None, head: HeadConfig | None = None,
                 callbacks: Sequence[Callback] | None = None,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.classes = list(classes)
        self.loss = loss  # a user's training loss; None: the config's (cross-entropy or BCE)
        self.policy = policy or FreezePolicy()
        self.policy.prepare(model)  # LoRA adapters, if the policy has them, before the model moves
        self.config = config or TrainConfig()
        self.augment = augment or AugmentConfig()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.callbacks: list[Callback] = list(callbacks or [])
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        self.backbone = backbone or getattr(model, "tlkit_backbone_config", None) or BackboneConfig(name=arch, pretrained=False)
        if data_config and not set(DATA_CONFIG_KEYS) <= set(data_config):
            # A partial one: the rest from the backbone's own settings (a known file's mean/std), then the model.
            data_config = resolve_data_config(model, {**self.backbone.data_config.model_dump(exclude_none=True),
                                                      **data_config})
        # A model that went through FineTuner keeps its resolved data config when wrapped again.
        self.data_config = (data_config or getattr(model, "tlkit_data_config", None)
                            or resolve_data_config(model, self.backbone.data_config))
        model.tlkit_data_config = self.data_config
        self.head = self._check_head(head or _infer_head_config(model, len(self.classes)))
        check_head_width(model, self.classes)
        self._setup_runtime(model)
        self.train_transform, self.eval_transform = create_transforms(self.data_config, self.augment)
        self.draft_size = eval_resize_size(self.data_config) if self.config.jpeg_draft else None
        self.eval_batch_size: int = self.config.eval_batch_size or (16 if self.device.type == "cpu" else 64)
        self.feature_cache = FeatureCache(self.config.feature_cache_dir)
        self.ddp_wrap = DDPWrapper(self.dist, self.device, self.config.find_unused_parameters)
        self.worker_init_fn: Any = worker_init_fn()  # DataLoader workers die with this process
        self._compiled: nn.Module | None = None
        self.ema: nn.Module | None = None  # timm ModelEmaV3 while config.ema_decay is set
        self.wise_anchor: dict[str, torch.Tensor] | None = None  # WiSE-FT's anchor (config.wise_ft)
        self.wise_twin: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = make_grad_scaler(self.amp_dtype, self.device)  # float16 only
        self.step = self.epoch = self.steps_per_epoch = 0
        self.should_stop = False
        self.best: dict[str, Any] = {"metric": None, "epoch": None}
        self.history: list[dict[str, Any]] = []
        self.checkpoint_metadata: dict[str, Any] | None = None
        # {"temperature", "reject_threshold"} fitted on the validation split (tlkit.calibration).
        self.calibration: dict[str, float] | None = None
        # Multi-label: the per-label thresholds tuned on the validation split (0.5 before any).
        self.thresholds: list[float] | None = None

    def _check_head(self, head: HeadConfig) -> HeadConfig:
        if len(self.classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.classes}: add a folder per class")
        if head.num_classes is None:
            head = head.model_copy(update={"num_classes": len(self.classes)})
        if head.num_classes != len(self.classes):
            raise ValueError(f"head has {head.num_classes} classes but {len(self.classes)} class names were given")
        return head

    def _setup_runtime(self, model: nn.Module) -> None:
        # Under torchrun, join the process group before picking the device (cuda:LOCAL_RANK).
        self.dist: DistributedContext | None = (
            init_distributed(self.config.device) if self.config.distributed == "auto" else None)
        self.is_main = self.dist is None or self.dist.is_main
        device = resolve_device(self.config.device)
        if self.dist is not None and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.dist.local_rank)
        has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
        channels_last = self.config.channels_last if self.config.channels_last is not None else has_conv
        self.runtime = Runtime(device, resolve_precision(self.config.precision, device), channels_last,
                               self.config.flush_denormal)
        self.model = model.to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @property
    def multilabel(self) -> bool:
        """Whether the head is multi-label (sigmoid outputs, `HeadConfig.multilabel`)."""
        return self.head.multilabel

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.runtime.device

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype, ``None`` for float32."""
        return self.runtime.amp_dtype

    @property
    def channels_last(self) -> bool:
        """Whether 4-D inputs and the model use ``torch.channels_last``."""
        return self.runtime.channels_last

    @classmethod
    def from_config(cls, config: RunConfig, classes: Sequence[str], callbacks: Sequence[Callback] | None = None) -> FineTuner:
        """Build backbone, head, policy and loop from a `RunConfig`.

        The backbone is resolved first (`tlkit.resolve_backbone`: weights source, what a known
        weights file needs), and the tuner records the resolved settings, so its checkpoints
        rebuild the network it trains. The new head (and a random-init backbone) is initialised
        under ``config.train.seed``, so the same config gives the same initial weights; the
        caller's RNG is left as it was. Without ``config.output_dir`` the run gets a new folder
        (`RunConfig.with_run_dir`).

        Raises:
            ValueError / RuntimeError / FileNotFoundError: as `tlkit.create_backbone`.
        """
        config = config.with_run_dir()  # output_dir None: a new folder per run
        backbone = resolve_backbone(config.backbone)
        head = config.head.model_copy(update={"num_classes": config.head.num_classes or len(classes)})
        with seeded(config.train.seed)():
            model = create_backbone(backbone)
            HeadReplacer.from_config(head, seed=config.train.seed).apply(model)
        return cls(model, classes, policy=config.freeze, config=config.train,
                   data_config=resolve_data_config(model, backbone.data_config),
                   augment=config.data.augment, output_dir=config.output_dir, backbone=backbone,
                   head=head, callbacks=callbacks)

    # -- helpers the training core uses ----------------------------------------------------------
    def forward_module(self) -> nn.Module:
        """The model, or its ``torch.compile`` wrapper (same parameters) with ``config.compile``."""
        if not self.config.compile:
            return self.model
        if self._compiled is None:
            self._compiled = torch.compile(self.model)
        return self._compiled

    def prepare_distributed(self) -> None:
        """Check DDP preconditions and convert BatchNorm to SyncBatchNorm if configured."""
        self.model = prepare_model_for_ddp(self.model, self.config, self.device)

    def class_weights(self, train: Any) -> torch.Tensor | None:
        """The cross-entropy class weights ``config.class_weights`` asks for (see `tlkit._training.optim.class_weights`).

        Returns:
            float32 ``(num_classes,)`` on the model's device, or ``None`` for ``"none"``.

        Raises:
            ValueError: a weight list of the wrong length, or ``"balanced"`` on data without ``targets``.
        """
        return class_weights(self.config.class_weights, self.classes, train, self.device)

    @property
    def trainable_parameters(self) -> int:
        """Number of scalar parameters with ``requires_grad``."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def cached_features(self, data: ImageFolderDataset, view: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled pre-logit features of ``data`` from the feature cache, computed on a miss.

        Args:
            data: the images (their paths, sizes and modification times are part of the key).
            view: ``None`` for the eval transform, else the index of a seeded augmented view made
                with the training transform.

        Returns:
            ``(features, labels)``: float32 ``(N, num_features)`` and int64 ``(N,)``, CPU.
        """
        return cached_features(self, data, view)

    # -- training -------------------------------------------------------------------------------
    def fit(self, train: Any, val: Any = None, *, resume: bool | str | Path = False,
            overwrite: bool = False) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs, evaluating on ``val`` after each.

        At the start of every epoch the `FreezePolicy` is applied; at a phase boundary
        newly unfrozen parameters join the optimizer with their own learning rate while the
        others keep their state. The learning rate follows a linear warm-up then cosine decay,
        per optimizer step. With ``output_dir`` set, each epoch writes ``last.state.pt`` (the
        resume state, weights included, one atomic file) first, then ``last.safetensors``,
        ``best.safetensors`` when ``config.best_metric`` improves, and ``metrics.jsonl``.
        Callbacks run at the hooks listed in `tlkit.callbacks`.

        Before anything else, every `ImageFolderDataset` not scanned yet is scanned
        (`ImageFolderDataset.scan`): with ``bad_images="skip"`` unusable files are dropped and
        the report is printed to stderr, with ``"error"`` the scan raises before training.

        Args:
            train: an `ImageFolderDataset` (the training transform is applied), a dataset
                yielding ``(float32 tensor (3, H, W), int label)``, or a DataLoader of such batches.
            val: the same kinds, evaluated with the eval transform; ``None`` skips validation.
            resume: ``True`` to continue from ``output_dir/last.state.pt`` (when the folder holds
                no run files at all, as after a crash in the first epoch, training starts at
                epoch 1), or a path to a ``.state.pt`` file.
            overwrite: start a new run in an ``output_dir`` that holds another run's files,
                deleting them first (`tlkit.runlock.RUN_FILES`). Without it (and without
                ``resume``) such a folder is refused, so a finished run is never lost.

        Returns:
            One dict per epoch: ``epoch`` (its 1-based number), ``train_loss``, ``val_loss``,
            ``top1``, ``macro_f1``, ``per_class_recall``, ``confusion_matrix``, ``lr``,
            ``trainable_params``, ``seconds``, ``images_per_s``, ``cached_features`` (whether
            the epoch trained from cached features; see ``TrainConfig.feature_cache``), and
            whatever callbacks added.

        Raises:
            ValueError: the policy leaves nothing trainable, or the classes do not match.
            BadImageError: a dataset with ``bad_images="error"`` holds unusable files (lists them).
            FloatingPointError: the training or validation loss became NaN or infinite (names the
                epoch and step). The failing step is not taken (BatchNorm statistics are restored
                too), no file with non-finite tensors is written, and the files of the last
                completed epoch are left as they were.
            CheckpointError: the resume state is missing, truncated, corrupted or does not fit.
            RunLockedError: another process trains into ``output_dir`` (names it), before any work.
            RunExistsError: (a ``ValueError``) ``output_dir`` holds a run and neither ``resume``
                nor ``overwrite`` is set, before any work.
            OutputDirError: ``output_dir`` cannot be created or written, before any work.
            RunFileError: writing a run file failed (disk full...): one line naming the file and
                what is kept; the files of the last completed epoch stay.
            KeyboardInterrupt: Ctrl-C, or SIGTERM (as `TrainingInterrupted`); the files of the
                last completed epoch stay and ``resume=True`` continues.
        """
        loop = FitLoop(self, train, val, default_callbacks(self, self.callbacks))
        with run_guard(self), self.runtime.cpu_flags():
            claim_run_folder(self, resume=resume, overwrite=overwrite)
            return loop.run(resume)

    def lr_find(self, train: Any, *, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
                epoch: int = 0, diverge: float = 4.0, smoothing: float = 0.98) -> LRFinderResult:
        """Learning-rate range test (Smith, 2017; fastai's ``lr_find``), then restore the model.

        Trains the parameters the freeze policy trains at epoch index ``epoch``, with that
        phase's per-group LR scales (layer-wise decay included), on augmented training batches,
        through the same train step as `fit` (loss scaling under float16, gradient clipping,
        the NaN guard), while the head group's LR grows exponentially from ``start_lr`` to
        ``end_lr``. Weights, BatchNorm statistics and random state are put back afterwards; the
        loop's own optimizer is untouched. Plot the result with `LRFinderResult.plot`.

        Args:
            train: the training data (as for `fit`).
            start_lr: first learning rate of the head group.
            end_lr: last learning rate of the head group.
            num_steps: mini-batches in the sweep (the data is cycled if shorter).
            epoch: which phase of the policy to test (e.g. the epoch after an unfreeze).
            diverge: stop when the smoothed loss exceeds this multiple of its minimum.
            smoothing: EMA coefficient of the smoothed loss (fastai's 0.98).

        Returns:
            `LRFinderResult` with the learning rates, losses, the valley suggestion and a warning
            when there is none or it sits at an edge of the sweep.

        Raises:
            ValueError: ``start_lr`` not below ``end_lr``, fewer than 2 steps, or empty data.
            RuntimeError: called under DDP (the range test runs in one process).
        """
        if not 0 < start_lr < end_lr:
            raise ValueError(f"need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
        if num_steps < 2:
            raise ValueError(f"num_steps must be at least 2, got {num_steps}")
        return run_lr_find(self, train, start_lr, end_lr, num_steps, epoch, diverge, smoothing)

    # -- evaluation and prediction --------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: Any, batch_size: int | None = None, *, tta: str = "none") -> ClassificationMetrics:
        """Top-1, per-class recall, macro-F1, confusion matrix and mean loss on ``data``; for a
        multi-label model `tlkit.metrics.MultiLabelMetrics` (mAP, F1 at the model's thresholds).

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
        check_tta_mode(tta)
        dataset = prepare_dataset(data, self.classes, self.eval_transform, self.draft_size)
        loader, sharded = eval_loader(dataset, batch_size or self.eval_batch_size, dist=self.dist,
                                      num_workers=self.config.num_workers, device=self.device,
                                      worker_init_fn=self.worker_init_fn)
        with self.runtime.cpu_flags():
            m = evaluate_loader(self.model, self.forward_module(), loader, self.classes, self.runtime,
                                sharded=sharded, tta=tta, progress=self.config.bars and self.is_main,
                                multilabel=self.multilabel)
        if self.multilabel and self.thresholds:
            m.thresholds = list(self.thresholds)  # the decisions at the thresholds the model ships with
        return m

    def prepare_input(self, item: Any, max_pixels: int | None = MAX_PIXELS, max_bytes: int | None = MAX_BYTES) -> torch.Tensor:
        """One model input, float32 ``(3, H, W)``: a file or PIL image through the eval transform, a tensor as is.

        Raises:
            BadImageError: an unreadable file, or one over ``max_pixels`` / ``max_bytes``.
            TypeError: an unsupported input type.
        """
        if isinstance(item, (str, Path)):
            return self.eval_transform(load_image(item, max_pixels=max_pixels, max_bytes=max_bytes,
                                                  draft_size=self.draft_size))
        if isinstance(item, Image.Image):
            return self.eval_transform(to_rgb(item))
        if isinstance(item, torch.Tensor) and item.ndim == 3:
            return item
        raise TypeError(f"cannot predict on {type(item).__name__}: pass paths, PIL images or (3, H, W) / (B, 3, H, W) tensors")

    @torch.no_grad()
    def predict(self, inputs: Any, batch_size: int | None = None, *, top_k: int | None = None,
                max_pixels: int | None = MAX_PIXELS, max_bytes: int | None = MAX_BYTES, tta: str = "none",
                on_error: str | Callable[[str, str], None] = "skip") -> list[Prediction]:
        """Classify images with the saved data config's eval transform (never augmentation).

        Files are treated as untrusted: each is checked against ``max_bytes`` and, from its
        header, ``max_pixels`` before it is decoded (see `tlkit.load_image`). As ``tlkit
        predict`` does, an unreadable file costs only its own prediction: it is reported and
        skipped, and the others are classified.

        Args:
            inputs: a file, a folder (every image inside, recursively, sorted), a glob, a PIL
                image, a tensor, or a list of them. Tensors are taken as model input: float32
                ``(3, H, W)`` or ``(B, 3, H, W)``, already normalised. PIL images with
                transparency are composited onto white, as files are.
            batch_size: images per forward pass; default `eval_batch_size`.
            top_k: how many ``(class, probability)`` pairs each `Prediction.top` holds; default
                every class, most probable first.
            max_pixels: largest accepted width x height of an image file.
            max_bytes: largest accepted size of an image file, in bytes.
            tta: test-time augmentation: ``"none"``, ``"hflip"`` or ``"multi-crop"`` (see
                `tlkit.tta`); probabilities are then averaged over the views.
            on_error: what an unreadable file does: ``"skip"`` (default) leaves it out of the
                result with a `tlkit.SkippedImageWarning` naming it; ``"raise"`` raises
                `BadImageError`; a callable gets ``(path, message)`` instead of the warning.

        Returns:
            One `Prediction` per readable image, in input order; `Prediction.path` names the
            file each came from. With a `calibration` (fitted on the validation split by `fit`,
            stored in its checkpoints) the probabilities are temperature-scaled and a prediction
            below the reject threshold is not `Prediction.sure` (its `answer` is "not sure").

        Raises:
            BadImageError: (a ``ValueError``) with ``on_error="raise"``: an image file is
                unreadable, truncated, or over a limit (names it and the limit).
            FileNotFoundError: a folder without images, or a glob that matches nothing.
            TypeError: an input of an unsupported type.
            ValueError: an unknown ``tta`` mode or ``on_error``, or ``top_k`` < 1.
        """
        check_tta_mode(tta)  # before decoding anything
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        items = predict_items(inputs)
        with self.runtime.cpu_flags():
            return predict_batches(self.model, items, lambda it: self.prepare_input(it, max_pixels, max_bytes),
                                   self.classes, self.runtime, batch_size or self.eval_batch_size, tta=tta,
                                   progress=self.config.bars and self.is_main, top_k=top_k,
                                   on_error=error_handler(on_error), calibration=self.calibration,
                                   thresholds=(self.thresholds or [0.5] * len(self.classes)) if self.multilabel else None)

    # -- persistence ----------------------------------------------------------------------------
    def metadata(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON stored in every checkpoint's header (``epoch``: completed epochs)."""
        return run_state.checkpoint_header(self, metrics)

    def save(self, path: str | Path, metrics: dict[str, Any] | None = None) -> Path:
        """Write the model and its metadata to a ``.safetensors`` checkpoint, atomically."""
        return save_checkpoint(path, self.model.state_dict(), self.metadata(metrics))

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a plain timm folder that ``timm.create_model("local-dir:PATH")`` loads (see `tlkit.hub`).

        ``config.json`` holds the architecture, ``num_classes``, the class names as
        ``label_names``, the data config and model kwargs; ``model.safetensors`` the weights.

        Raises:
            ValueError: a head plain timm cannot build (a hidden layer).
        """
        from tlkit.hub import save_pretrained

        return save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", **config_overrides: Any) -> FineTuner:
        """A ready model from a plain timm folder (`save_pretrained`, or one downloaded from the hub).

        Args:
            path: the folder with ``config.json`` and ``model.safetensors``.
            device: where the model runs.
            **config_overrides: `TrainConfig` fields (``progress``, ``eval_batch_size``...).

        Raises:
            ValueError: the folder is missing, malformed or out of bounds (names the file).
        """
        from tlkit.hub import load_pretrained

        model, classes, kwargs, data = load_pretrained(path)
        backbone = BackboneConfig(name=model.pretrained_cfg.get("architecture", type(model).__name__),
                                  pretrained=False, model_kwargs=kwargs, data_config=data)
        config = TrainConfig(**{"device": device, **config_overrides})
        return cls(model, classes, config=config, backbone=backbone,
                   data_config=resolve_data_config(model, backbone.data_config))

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", *, classes: Sequence[str] | None = None,
             num_classes: int | None = None, adapt_head: bool = False, **config_overrides: Any) -> FineTuner:
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
            ValueError: ``classes`` and ``num_classes`` disagree.
        """
        path = resolve_checkpoint(path)
        state, meta = load_checkpoint(path)
        run = read_header(meta, path, device, config_overrides, state)
        wanted = choose_classes(run.classes, classes, num_classes, adapt_head, path)
        new_head = wanted != run.classes
        head = run.head.model_copy(update={"num_classes": len(wanted)}) if new_head else run.head
        with seeded(run.train.seed)():  # a new head is initialised the same way on every load
            model = create_backbone(run.backbone)
            HeadReplacer.from_config(head, seed=run.train.seed).apply(model)
        tuner = cls(model, wanted, policy=run.policy, config=run.train, data_config=run.data_config,
                    augment=run.augment, backbone=run.backbone, head=head)
        skip = tuple(f"{n}." for n in classifier_module_names(tuner.model)) if new_head else ()
        run_state.load_weights_checked(tuner.model, state, path, skip)
        tuner.epoch = 0 if new_head else run.epoch
        tuner.calibration = None if new_head else run.calibration
        tuner.thresholds = None if new_head else run.thresholds
        tuner.checkpoint_metadata = meta
        tuner.model.eval()
        return tuner
