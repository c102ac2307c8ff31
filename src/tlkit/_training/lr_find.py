"""The learning-rate range test on the fit loop's own train step (see `FineTuner.lr_find`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from tlkit._loaders import prepare_dataset, train_loader
from tlkit._rng import rng_state, set_rng_state
from tlkit._runtime import make_grad_scaler
from tlkit._training.optim import build_criterion, class_weights, new_optimizer
from tlkit._training.step import NonFiniteLossError, TrainStep
from tlkit.lr_finder import LRFinderResult

if TYPE_CHECKING:
    from tlkit._protocols import Run

__all__ = ["run_lr_find"]


def _snapshot(tuner: Run) -> tuple[dict, dict, dict, bool]:
    model = tuner.model
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return weights, grads, rng_state(), model.training


def _restore(tuner: Run, saved: tuple[dict, dict, dict, bool]) -> None:
    weights, grads, rng, was_training = saved
    tuner.model.load_state_dict(weights)
    for n, p in tuner.model.named_parameters():
        p.requires_grad_(grads[n])
        p.grad = None
    set_rng_state(rng)
    tuner.model.train(was_training)


def run_lr_find(tuner: Run, train: Any, start_lr: float, end_lr: float, num_steps: int, epoch: int,
                diverge: float, smoothing: float) -> LRFinderResult:
    """Sweep, then put back weights, BatchNorm statistics, ``requires_grad`` flags and random state."""
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2, got {num_steps}")
    if tuner.dist is not None:
        raise RuntimeError("lr_find runs in one process: start it without torchrun (or with distributed='off')")
    saved = _snapshot(tuner)
    try:
        with tuner.runtime.cpu_flags():
            return _sweep(tuner, train, start_lr, end_lr, num_steps, epoch, diverge, smoothing)
    finally:
        _restore(tuner, saved)


def _sweep(tuner: Run, train: Any, start_lr: float, end_lr: float, num_steps: int, epoch: int,
           diverge: float, smoothing: float) -> LRFinderResult:
    cfg, rt = tuner.config, tuner.runtime
    tuner.policy.apply(tuner.model, epoch)
    opt = new_optimizer(tuner.policy, tuner.model, cfg, epoch, start_lr)
    criterion = tuner.loss or build_criterion(cfg, class_weights(cfg.class_weights, tuner.classes, train, rt.device),
                                              len(tuner.classes), mix=False, multilabel=tuner.multilabel)[0]
    scaler = make_grad_scaler(rt.amp_dtype, rt.device)  # its own: the loop's scaler state is untouched
    step = TrainStep(tuner.model, opt, rt, criterion, scaler=scaler, grad_clip_norm=cfg.grad_clip_norm)
    dataset = prepare_dataset(train, tuner.classes, tuner.train_transform)
    growth = (end_lr / start_lr) ** (1 / (num_steps - 1))
    result = LRFinderResult(lrs=[], losses=[])
    avg, best, k = 0.0, math.inf, 0
    tuner.model.train()
    bar = tqdm(total=num_steps, desc="lr_find", leave=False, disable=None if cfg.bars and tuner.is_main else True)
    while k < num_steps and not result.diverged:
        batches = 0
        for x, y in _batches(dataset, cfg, k, rt.device):
            batches += 1
            lr = start_lr * growth**k
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            try:
                loss = step(tuner.model, x, y, k).item()
            except NonFiniteLossError:
                result.diverged = True
                break
            avg = smoothing * avg + (1 - smoothing) * loss
            smooth = avg / (1 - smoothing ** (k + 1))  # bias correction, as fastai
            result.lrs.append(lr)
            result.raw_losses.append(loss)
            result.losses.append(smooth)
            best, k = min(best, smooth), k + 1
            bar.update()
            if (k > 1 and smooth > diverge * best) or k >= num_steps:
                result.diverged = k > 1 and smooth > diverge * best
                break
        if batches == 0:
            raise ValueError("lr_find: the training data gave no batch")
    bar.close()
    result.suggest()
    result.loss_scale = float(scaler.get_scale()) if scaler is not None else None
    return result


def _batches(dataset: Any, cfg: Any, k: int, device: Any):
    loader = train_loader(dataset, cfg.batch_size, seed=cfg.seed, epoch=k, dist=None,
                          num_workers=cfg.num_workers, device=device)
    return (b for b in loader if b is not None)
