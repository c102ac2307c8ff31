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
from torch import nn

from tlkit._guard import claim_run_folder, run_guard
from tlkit._loaders import eval_loader, prepare_dataset
from tlkit._runtime import flush_denormal, make_grad_scaler, resolve_device, resolve_precision, setup_runtime
from tlkit._training import state as run_state
from tlkit._training.cached import cached_features
from tlkit._training.ddp import DDPWrapper
from tlkit._training.defaults import default_callbacks
from tlkit._training.inference import (
    Prediction,
    error_handler,
    evaluate_loader,
    predict_batches,
    predict_items,
    prepare_input,
)
from tlkit._training.loading import build_run, load_run, load_timm_folder
from tlkit._training.loop import FitLoop
from tlkit._training.lr_find import run_lr_find
from tlkit._training.optim import class_weights
from tlkit._training.progress import StateViews, TrainState
from tlkit._training.workers import worker_init_fn
from tlkit.backbone import (
    backbone_config_of,
    complete_data_config,
)
from tlkit.callbacks import Callback
from tlkit.checkpoint import save_checkpoint
from tlkit.config import AugmentConfig, BackboneConfig, HeadConfig, RunConfig, TrainConfig
from tlkit.data import ImageFolderDataset, create_transforms, eval_resize_size
from tlkit.features import FeatureCache
from tlkit.freeze import FreezePolicy
from tlkit.head import check_head_width, head_config_for
from tlkit.images import MAX_BYTES, MAX_PIXELS
from tlkit.lr_finder import LRFinderResult
from tlkit.metrics import ClassificationMetrics
from tlkit.tta import check_tta_mode

__all__ = ["FineTuner", "Prediction", "flush_denormal", "resolve_device", "resolve_precision"]


class FineTuner(StateViews):
    """Fine-tune a timm model: fit, evaluate, predict, save and load.

    Args:
        model: a timm model whose classifier has already been replaced (see
            `HeadReplacer`); output logits ``(B, len(classes))``.
        classes: class names in index order.
        policy: which parameters train at each epoch; default full fine-tune.
        config: optimisation and loop settings.
        data_config: timm data config (`tlkit.resolve_data_config`), saved in every checkpoint and
            used by `predict`; default, or a partial dict: see `tlkit.backbone.complete_data_config`.
        augment: training augmentation.
        output_dir: run folder for checkpoints and ``metrics.jsonl``; ``None`` writes nothing.
        backbone: how the model was built, so `load` can rebuild it (`tlkit.backbone.backbone_config_of`).
        head: the head's config; default inferred from the model.
        callbacks: `tlkit.callbacks.Callback` objects run by `fit` after the built-in ones
            (progress bar and epoch lines, early stopping, run report, ``TrainConfig.loggers``).
        loss: the training loss, ``loss(logits, target) -> scalar`` with logits float32
            ``(B, num_classes)`` and the dataset's targets (int64 ``(B,)``, or float ``(B, C)``
            multi-hot or mixed); default cross-entropy with ``label_smoothing`` and class weights
            (binary cross-entropy for a multi-label head). Validation keeps its own metrics.

    Use `from_config` to build everything from a `RunConfig`. Under ``torchrun``
    (``config.distributed="auto"``) the same code trains with ``DistributedDataParallel``
    (`tlkit.distributed`); ``config.batch_size`` is then per process.

    Attributes:
        model: the model, on `device`.
        epoch: completed epochs (0 before `fit`; what every checkpoint header records).
        step: optimizer steps taken.
        best: ``{"metric": value, "epoch": number}`` of the best validated epoch.
        history: one record per completed epoch (see `fit`).
        should_stop: set it to ``True`` from a callback to end `fit` after the current epoch.
        dist: this process's place in the process group, ``None`` in a single process.
        is_main: whether this process writes files and prints (rank 0, or the only process).
        checkpoint_metadata: the header of the checkpoint `load` read; ``None`` otherwise.
        calibration: ``{"temperature", "reject_threshold"}`` fitted on the validation split
            (`tlkit.calibration`), used by `predict`; ``None`` without validation data.
        state: the `tlkit._training.progress.TrainState` the loop owns; the counters above,
            ``optimizer``, ``ema``, ``calibration``... are views of its fields.
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
        self.backbone = backbone_config_of(model, backbone)
        self.data_config = complete_data_config(model, self.backbone, data_config)
        model.tlkit_data_config = self.data_config  # wrapped again, the model keeps its resolved data config
        self.head = head_config_for(model, self.classes, head)
        check_head_width(model, self.classes)
        self.dist, self.runtime, self.model = setup_runtime(model, self.config)
        self.is_main = self.dist is None or self.dist.is_main
        self.train_transform, self.eval_transform = create_transforms(self.data_config, self.augment)
        self.draft_size = eval_resize_size(self.data_config) if self.config.jpeg_draft else None
        self.eval_batch_size: int = self.config.eval_batch_size or (16 if self.device.type == "cpu" else 64)
        self.feature_cache = FeatureCache(self.config.feature_cache_dir)
        self.ddp_wrap = DDPWrapper(self.dist, self.device, self.config.find_unused_parameters)
        self.worker_init_fn: Any = worker_init_fn()  # DataLoader workers die with this process
        # What the fit loop changes (counters, best, history, optimizer, EMA...): one object it owns.
        self.state = TrainState(scaler=make_grad_scaler(self.amp_dtype, self.device))  # the scaler: float16 only
        self.checkpoint_metadata: dict[str, Any] | None = None

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

        The backbone is resolved first (`tlkit.resolve_backbone`) and recorded as resolved, so
        checkpoints rebuild the network trained. New weights are initialised under
        ``config.train.seed`` (the caller's RNG is left as it was). Without ``config.output_dir``
        the run gets a new folder (`RunConfig.with_run_dir`).

        Raises:
            ValueError / RuntimeError / FileNotFoundError: as `tlkit.create_backbone`.
        """
        return build_run(cls, config, classes, callbacks)

    # -- what the training core and tests read ------------------------------------------------------
    def class_weights(self, train: Any) -> torch.Tensor | None:
        """``config.class_weights`` as float32 ``(num_classes,)`` on the device, ``None`` for ``"none"``.

        Raises:
            ValueError: a weight list of the wrong length, or ``"balanced"`` on data without ``targets``.
        """
        return class_weights(self.config.class_weights, self.classes, train, self.device)

    @property
    def trainable_parameters(self) -> int:
        """Number of scalar parameters with ``requires_grad``."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def cached_features(self, data: ImageFolderDataset, view: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled pre-logit features of ``data`` (``view``: ``None`` eval transform, else the index
        of a seeded augmented view) from the feature cache, computed on a miss: float32
        ``(N, num_features)`` and int64 ``(N,)`` labels, on the CPU."""
        return cached_features(self, data, view)

    # -- training -------------------------------------------------------------------------------
    def fit(self, train: Any, val: Any = None, *, resume: bool | str | Path = False,
            overwrite: bool = False) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs, evaluating on ``val`` after each.

        Each epoch the `FreezePolicy` is applied (newly unfrozen parameters join the optimizer
        with their own learning rate); the learning rate follows ``config.schedule`` per step.
        With ``output_dir`` set, each epoch writes ``last.state.pt`` (the resume state, one
        atomic file) first, then ``last.safetensors``, ``best.safetensors`` when
        ``config.best_metric`` improves, and ``metrics.jsonl``. Callbacks run at the hooks of
        `tlkit.callbacks`. Unscanned `ImageFolderDataset` s are scanned first (bad files skipped
        and reported, or an error before training, as ``bad_images`` says).

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
            One dict per epoch: ``epoch`` (1-based), ``train_loss``, ``val_loss``, ``top1``,
            ``macro_f1``, ``per_class_recall``, ``confusion_matrix``, ``lr``, ``trainable_params``,
            ``seconds``, ``images_per_s``, ``cached_features``, and what callbacks added.

        Raises:
            ValueError: the policy leaves nothing trainable, or the classes do not match.
            BadImageError: a dataset with ``bad_images="error"`` holds unusable files (lists them).
            FloatingPointError: a NaN or infinite loss (names epoch and step); that step is not
                taken and the files of the last completed epoch stay as they were.
            CheckpointError: the resume state is missing, truncated, corrupted or does not fit.
            RunLockedError / RunExistsError / OutputDirError: before any work, ``output_dir`` is
                in use by another process, holds a run (without ``resume`` or ``overwrite``), or
                cannot be written.
            RunFileError: writing a run file failed (disk full...); one line, last epoch's files kept.
            KeyboardInterrupt: Ctrl-C or SIGTERM (`TrainingInterrupted`); ``resume=True`` continues.
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

        Under DDP each rank evaluates its shard of a dataset and every rank returns the whole's metrics.

        Raises:
            ValueError: empty data, or an unknown ``tta`` mode.
        """
        check_tta_mode(tta)
        dataset = prepare_dataset(data, self.classes, self.eval_transform, self.draft_size)
        loader, sharded = eval_loader(dataset, batch_size or self.eval_batch_size, dist=self.dist,
                                      num_workers=self.config.num_workers, device=self.device,
                                      worker_init_fn=self.worker_init_fn)
        with self.runtime.cpu_flags():
            m = evaluate_loader(self.model, self.runtime.forward(self.model), loader, self.classes, self.runtime,
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
        return prepare_input(item, self.eval_transform, self.draft_size, max_pixels, max_bytes)

    @torch.no_grad()
    def predict(self, inputs: Any, batch_size: int | None = None, *, top_k: int | None = None,
                max_pixels: int | None = MAX_PIXELS, max_bytes: int | None = MAX_BYTES, tta: str = "none",
                on_error: str | Callable[[str, str], None] = "skip") -> list[Prediction]:
        """Classify images with the saved data config's eval transform (never augmentation).

        Files are untrusted: each is checked against ``max_bytes`` and ``max_pixels`` before it is
        decoded (`tlkit.load_image`); an unreadable one costs only its own prediction.

        Args:
            inputs: a file, a folder (its images, recursively, sorted), a glob, a PIL image, a
                tensor (model input, float32 ``(3, H, W)`` or ``(B, 3, H, W)``), or a list of them.
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
            One `Prediction` per readable image, in input order (`Prediction.path` names its file).
            With a `calibration` the probabilities are temperature-scaled, and one below the reject
            threshold is not `Prediction.sure` (its `answer` is "not sure").

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
        return load_timm_folder(cls, path, device, config_overrides)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", *, classes: Sequence[str] | None = None,
             num_classes: int | None = None, adapt_head: bool = False, **config_overrides: Any) -> FineTuner:
        """Rebuild a ready model from a checkpoint file or a run folder (its best checkpoint).

        Needs no config file, no user code and no network: the backbone is built with
        ``pretrained=False`` from the stored name and kwargs, then the stored weights are loaded.

        The file may come from someone else: its header must pass a strict schema, the model it
        describes is built on the ``meta`` device and must have exactly the file's tensors before
        real memory is allocated, and resource settings come from this call, never from the file
        ("Threat model" in the reliability docs). With ``adapt_head=True`` and other ``classes``,
        the backbone weights load and a new head (seeded by the stored ``TrainConfig.seed``) is made.

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
        return load_run(cls, path, device, classes, num_classes, adapt_head, config_overrides)
