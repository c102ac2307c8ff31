"""The fit loop: setup, start or resume, one epoch at a time, teardown (after Lightning's ``FitLoop``).

The loop owns the order of things; what happens around it (printing, early stopping, reports,
loggers) hangs off callback hooks (`tlkit.callbacks`). State lives on the `FineTuner` the loop
drives, so the attributes users read (``step``, ``epoch``, ``best``, ``history``, ``optimizer``)
are always current.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from tlkit._introspect import classifier_param_names
from tlkit._loaders import eval_loader, prepare_dataset, steps_per_epoch, train_loader
from tlkit._rng import rng_state, seed_everything
from tlkit._training import state as run_state
from tlkit._training.averaging import capture_anchor, shipped_module
from tlkit._training.ddp import prepare_model_for_ddp
from tlkit._training.inference import evaluate_loader
from tlkit._training.optim import build_criterion, class_weights, join_phase, new_optimizer, set_learning_rates
from tlkit._training.step import NonFiniteLossError, TrainStep
from tlkit._training.task import best_key, check_task
from tlkit.calibration import calibration_summary
from tlkit.callbacks import CallbackList, improves
from tlkit.data import ImageFolderDataset
from tlkit.distributed import all_gather_object, all_reduce_sum, barrier
from tlkit.features import classifier_is_last_step
from tlkit.images import load_image
from tlkit.metrics import tune_thresholds

if TYPE_CHECKING:
    from tlkit._protocols import Run

__all__ = ["FitLoop"]

class FitLoop:
    """Trains ``tuner`` on ``train`` for ``tuner.config.epochs`` epochs (see `FineTuner.fit`)."""

    def __init__(self, tuner: Run, train: Any, val: Any, callbacks: CallbackList) -> None:
        self.tuner, self.train, self.val, self.callbacks = tuner, train, val, callbacks
        self.cfg = tuner.config

    # -- the whole run --------------------------------------------------------------------------
    def run(self, resume: bool | str | Path = False) -> list[dict[str, Any]]:
        """Set up, resume if asked, train epoch by epoch until done or stopped, tear down."""
        t = self.tuner
        self._setup()
        start = self._start_or_resume(resume)
        self.callbacks.call("on_fit_start", t, self.train, self.val)
        for index in range(start, self.cfg.epochs):
            if self._run_epoch(index):
                break
        self._teardown()
        return t.history

    def _scan(self) -> None:
        for data in (self.train, self.val):
            if isinstance(data, ImageFolderDataset) and data.scan_report is None:
                report = data.scan()
                if (report.bad or report.ignored) and self.tuner.is_main:
                    tqdm.write(report.summary(), file=sys.stderr)

    def _setup(self) -> None:
        t, cfg = self.tuner, self.cfg
        self._scan()
        if t.dist is not None:
            t.model = prepare_model_for_ddp(t.model, t.config, t.device)
        # A deterministic training transform (the eval transform itself) decodes JPEGs as eval
        # does, so cached-feature and full epochs see the same pixels.
        draft = t.draft_size if t.train_transform is t.eval_transform else None
        self.train_ds = prepare_dataset(self.train, t.classes, t.train_transform, draft)
        self.val_ds = prepare_dataset(self.val, t.classes, t.eval_transform, t.draft_size) if self.val is not None else None
        self.batches_per_epoch = steps_per_epoch(self.train_ds, cfg.batch_size, t.dist)
        t.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.accumulate_steps)  # optimizer steps
        self.total_steps = cfg.epochs * t.steps_per_epoch
        self.warmup_steps = round(cfg.warmup_epochs * t.steps_per_epoch)
        weights = class_weights(cfg.class_weights, t.classes, self.train, t.runtime.device)
        check_task(t, self.train)
        self.criterion, self.mixup = build_criterion(cfg, weights, len(t.classes), multilabel=t.multilabel)
        if t.loss is not None:  # the user's loss; timm's Mixup still mixes the targets it gets
            self.criterion = t.loss
        seed_everything(cfg.seed + (t.dist.rank if t.dist else 0))  # as timm: seed + rank
        t.policy.check_epochs(cfg.epochs)
        for e in [0, *t.policy.boundaries()]:  # fail before any work if a phase is unusable
            t.policy.trainable_names(t.model, e)
        self.use_cache = self._can_use_cache()
        self.head_names = set(classifier_param_names(t.model))

    def _can_use_cache(self) -> bool:
        t = self.tuner
        if not (self.cfg.feature_cache and self.mixup is None and isinstance(self.train, ImageFolderDataset)):
            return False
        x = torch.stack([t.eval_transform(load_image(self.train.samples[0][0]))])
        return classifier_is_last_step(t.model, t.runtime.to_device(x))

    def _start_or_resume(self, resume: bool | str | Path) -> int:
        t, cfg = self.tuner, self.cfg
        t.policy.apply(t.model, 0)
        t.optimizer = new_optimizer(t.policy, t.model, cfg, 0, cfg.lr)
        t.state.reset()  # the loop's counters, best and history start over (resume refills them)
        if cfg.ema_decay is not None:
            from timm.utils import ModelEmaV3

            # Warm-up (decay 1 - (1 + step)^-3/4, capped at ema_decay): short fine-tunes have few
            # steps, and a fixed 0.999 would keep the average near the pretrained weights.
            t.ema = ModelEmaV3(t.model, decay=cfg.ema_decay, use_warmup=True, warmup_power=0.75)
        start = 0
        if resume:
            if t.output_dir is not None and t.is_main:
                run_state.clean_temp_files(t.output_dir)
            path = run_state.state_path_for(t, resume)
            start = run_state.restore(t, path, self.callbacks) if path is not None else 0
        if t.history and t.history[-1].get("early_stop"):
            start = cfg.epochs  # the resumed run had already stopped early
        if resume and start and t.is_main:
            done = t.history[-1]["epoch"] if t.history else start
            tqdm.write(f"resume: {t.output_dir or path} " + (f"continues after epoch {done} of {cfg.epochs}"
                       if start < cfg.epochs else f"is complete ({done} of {cfg.epochs} epochs); nothing to train"),
                       file=sys.stderr)
        self.step = TrainStep(t.model, t.optimizer, t.runtime, self.criterion, scaler=t.scaler,
                              grad_clip_norm=cfg.grad_clip_norm, mixup=self.mixup, ema=t.ema, dist=t.dist)
        return start

    def _teardown(self) -> None:
        t = self.tuner
        shipped = shipped_module(t)
        if shipped is not t.model:
            t.model.load_state_dict(shipped.state_dict())
        if t.history:
            t.epoch = t.history[-1]["epoch"]
        self.callbacks.call("on_fit_end", t)
        barrier()

    # -- one epoch ------------------------------------------------------------------------------
    def _run_epoch(self, index: int) -> bool:
        """Train epoch ``index`` (0-based), validate, record and write it; returns whether to stop."""
        t = self.tuner
        t.epoch = index  # completed epochs so far
        capture_anchor(t, index)  # WiSE-FT: the linear probe's weights, at the first unfreeze
        trainable = t.policy.apply(t.model, index)
        joined = None
        if index in t.policy.boundaries():
            joined = join_phase(t.optimizer, t.policy, t.model, self.cfg, index, t.step)
        self.callbacks.call("on_epoch_start", t, index + 1)
        if joined is not None:
            self.callbacks.call("on_phase_start", t, index + 1, joined)
        cached = self.use_cache and trainable <= self.head_names
        record = self._train_epoch(index, cached)
        if self.val_ds is not None:
            self._validate(record, cached)
        return self._end_epoch(record)

    def _epoch_source(self, index: int, cached: bool) -> tuple[Any, Any]:
        """What trains this epoch (the model, or the classifier on cached features) and its loader."""
        t, cfg = self.tuner, self.cfg
        if cached:
            view = index % cfg.feature_views if cfg.feature_views else None
            data: Any = TensorDataset(*t.cached_features(self.train, view))
            forward = t.ddp_wrap(t.model.get_classifier())
        else:
            data, forward = self.train_ds, t.ddp_wrap(t.runtime.forward(t.model))
        loader = train_loader(data, cfg.batch_size, seed=cfg.seed, epoch=index, dist=t.dist,
                              num_workers=cfg.num_workers, device=t.runtime.device, worker_init_fn=t.worker_init_fn,
                              sampler=cfg.sampler)
        return forward, loader

    def _train_epoch(self, index: int, cached: bool) -> dict[str, Any]:
        t, cfg = self.tuner, self.cfg
        t.model.train()
        t0 = time.perf_counter()  # includes feature extraction on a cache miss
        forward, loader = self._epoch_source(index, cached)
        total, seen = 0.0, 0
        k, batches = cfg.accumulate_steps, self._batches_in(loader)
        for i, batch in enumerate(loader):
            if batch is None:  # every file of the batch failed to load (bad_images="skip")
                continue
            x, y = batch
            start = i - i % k  # micro-batches [start, start + parts) make one optimizer step
            part = (i - start, min(k, batches - start))
            set_learning_rates(t.optimizer, cfg, t.step, self.total_steps, self.warmup_steps, t.steps_per_epoch)
            try:
                loss = self.step(forward, x, y, t.step, part=part).item()
            except NonFiniteLossError as e:
                raise FloatingPointError(f"loss is {e.loss} at epoch {index + 1} step {t.step}; {self._kept()}") from e
            t.step += int(part[0] == part[1] - 1)
            total, seen = total + loss * y.shape[0], seen + y.shape[0]
            self.callbacks.call("on_train_batch_end", t, loss, int(y.shape[0]))
        seconds = time.perf_counter() - t0
        if t.dist is not None:  # sums over ranks: the loss of every image, not a mean of means
            total, seen = (float(v) for v in all_reduce_sum(total, seen))
        return {
            "epoch": index + 1,
            "train_loss": total / max(seen, 1),
            "lr": cfg.lr * self._lr_factor(max(t.step - 1, 0)),
            "trainable_params": t.trainable_parameters,
            "seconds": seconds,
            "images_per_s": seen / seconds if seconds > 0 else None,
            "cached_features": cached,
        }

    def _batches_in(self, loader: Any) -> int:
        """Batches the epoch's loader yields (for the size of its last accumulation)."""
        try:
            return len(loader)
        except TypeError:  # an iterable without a length: every accumulation is full
            return 1 << 62

    def _lr_factor(self, step: int) -> float:
        from tlkit.schedule import lr_factor

        return lr_factor(self.cfg.schedule, step, self.total_steps, self.warmup_steps, self.cfg.min_lr_ratio)

    def _kept(self) -> str:
        out = self.tuner.output_dir
        return "the last good checkpoint is kept" + (f" in {out}" if out else "")

    def _validate(self, record: dict[str, Any], cached: bool) -> None:
        t = self.tuner
        judged = shipped_module(t)  # the EMA and/or WiSE-FT weights, when those are what ships
        bs, rt = t.eval_batch_size, t.runtime
        if cached and isinstance(self.val, ImageFolderDataset):
            data: Any = TensorDataset(*t.cached_features(self.val, None))
            forward = judged.get_classifier()
        else:
            data, forward = self.val_ds, (judged if judged is not t.model else t.runtime.forward(t.model))
        loader, sharded = eval_loader(data, bs, dist=t.dist, num_workers=self.cfg.num_workers, device=rt.device,
                                      worker_init_fn=t.worker_init_fn)
        outputs: list[torch.Tensor] = []
        m = evaluate_loader(judged, forward, loader, t.classes, rt, sharded=sharded,
                            progress=self.cfg.bars and t.is_main, outputs=None if sharded else outputs,
                            multilabel=t.multilabel)
        if not math.isfinite(m.loss):
            raise FloatingPointError(f"validation loss is {m.loss} at epoch {record['epoch']}; {self._kept()}")
        if t.multilabel:  # thresholds tuned on this epoch's validation outputs, kept with its checkpoint
            t.thresholds = tune_thresholds(m.probs, m.targets)
            m.thresholds = t.thresholds
            record.update(val_loss=m.loss, map=m.map, macro_f1=m.macro_f1, micro_f1=m.micro_f1,
                          per_label_ap=m.per_label_ap, per_label_f1=m.per_label_f1, thresholds=t.thresholds)
        else:
            record.update(val_loss=m.loss, top1=m.top1, macro_f1=m.macro_f1,
                          per_class_recall=m.per_class_recall, confusion_matrix=m.matrix.tolist())
            if outputs:  # temperature, ECE and reject threshold of this epoch's model (tlkit.calibration)
                record.update(calibration_summary(*outputs))
                t.calibration = {k: record[k] for k in ("temperature", "reject_threshold")}
        self.callbacks.call("on_validation_end", t, m)

    def _is_improvement(self, record: dict[str, Any]) -> bool:
        key = best_key(self.cfg, self.tuner.multilabel)
        value = record.get(key)
        return value is not None and improves(key, value, self.tuner.best["metric"])

    def _end_epoch(self, record: dict[str, Any]) -> bool:
        """Record the epoch, run ``on_epoch_end``, write its files in crash-safe order; returns the stop decision."""
        t = self.tuner
        t.history.append(record)
        improved = self._is_improvement(record)
        if improved:
            t.best = {"metric": record[best_key(self.cfg, t.multilabel)], "epoch": record["epoch"]}
        t.epoch = record["epoch"]
        self.callbacks.call("on_epoch_end", t, record)
        stop = bool(t.should_stop)
        if t.dist is not None:  # any rank may ask; every rank stops together
            stop = bool(all_reduce_sum(1.0 if stop else 0.0)[0] > 0)
        rng = [rng_state()] if t.dist is None else all_gather_object(rng_state())
        paths: dict[str, Path] = {}
        if t.is_main and t.output_dir is not None:
            paths = run_state.write_epoch(t, improved, rng, self.callbacks.state_dict())
        barrier()  # the epoch's files exist before any rank goes on
        if paths:
            self.callbacks.call("on_checkpoint_saved", t, paths)
        return stop

