"""Named training recipes: a recipe sets the freeze policy and loop settings of a RunConfig."""

from __future__ import annotations

from collections.abc import Callable, Sized

from tlkit.config import RunConfig
from tlkit.freeze import FreezePolicy

__all__ = ["FEW_PER_CLASS", "PROBE_VIEW", "PROBE_WORKERS", "RECIPES", "adapt_to_data", "apply_recipe"]


PROBE_VIEW = {"input_size": (3, 448, 336), "crop_pct": 1.0, "crop_mode": "squash"}
"""The linear probe's view: the whole frame (resized, not cropped) at 448 x 336 (height x width).

A frozen backbone's pooled features of the whole photo beat timm's 224 centre crop on photos
whose object fills the frame: MobileNetV2 probe top-1 on the TrashNet bench's held-out photos
85.6% at 224, 89.1% at 384 x 288, 91.1% at 448 x 336 (5-fold CV on the training pool: 83.4% ->
87.1% at 384 x 288). Fine-tuned models gained nothing from it, so only the probe uses it. The
size is portrait (TrashNet's 384 x 512 photos); for landscape photos set
``backbone.data_config.input_size=[3, 336, 448]``.
"""

PROBE_WORKERS = 1
"""DataLoader workers of the probe: the backbone runs once, forward only, so one worker decoding
the next photos while the two cores run the forward pass took the bench's probe from 52 s to
42 s (384 x 288, 2-core EPYC). Fine-tuning keeps 0: there a worker took cores the backward pass needs."""


def _linear_probe(cfg: RunConfig) -> RunConfig:
    # The classic recipe (frozen ImageNet features under a new Dense layer, 15 epochs of Adam),
    # trained from cached features of the eval view: on TrashNet with MobileNetV2 84.7% top-1 in
    # 32 s, against 85.6% (85.1% at the last epoch) in 523 s with random augmentation recomputed
    # every epoch; 5 cached augmented views gave 85.1% in 85 s. A gap of one to four images.
    # With PROBE_VIEW: 91.1% in 57 s.
    view = cfg.backbone.data_config.model_copy(update=PROBE_VIEW)
    return cfg.model_copy(update={
        "backbone": cfg.backbone.model_copy(update={"data_config": view}),
        "freeze": FreezePolicy.linear_probe(),
        "train": cfg.train.model_copy(update={"epochs": 15, "lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 1.0,
                                              "label_smoothing": 0.1, "feature_cache": True,
                                              "num_workers": PROBE_WORKERS}),
    })


def _finetune(cfg: RunConfig) -> RunConfig:
    # Head warm-up for 2 epochs (a linear probe), then the last four stages below the head
    # unfreeze with layer-wise decayed LRs; BatchNorm stays frozen (small batches, and weights
    # with folded BN such as the offline MobileNetV2 file need it).
    policy = FreezePolicy.linear_probe(batchnorm="frozen").then(2, depth=-5, layer_decay=0.6)
    return cfg.model_copy(update={
        "freeze": policy,
        "train": cfg.train.model_copy(update={"epochs": 12, "lr": 2e-3, "weight_decay": 0.01, "warmup_epochs": 1.0,
                                              "label_smoothing": 0.1}),
    })


def _finetune_strong(cfg: RunConfig) -> RunConfig:
    # The "finetune" schedule (2 epochs of head warm-up, then the last four stages with layer-wise
    # LR decay 0.6, BatchNorm frozen) run longer and regularised: TrivialAugment (Mueller &
    # Hutter 2021) and random erasing, an EMA of the weights (timm ModelEmaV3) for the last
    # epochs, balanced class weights for the rare `trash` class, and a one-epoch LR ramp for the
    # newly unfrozen stages (without it EfficientNet-Lite0 fell from 83% to 55% top-1 at the
    # unfreeze and needed five epochs to recover). Unfreezing every stage instead
    # (depth 0, decay 0.7) collapsed MobileNetV2 to 55% at the first unfrozen epoch: with
    # BatchNorm folded into the early convolutions, AdamW's per-weight steps wreck them.
    policy = FreezePolicy.linear_probe(batchnorm="frozen").then(2, depth=-5, layer_decay=0.6)
    augment = cfg.data.augment.model_copy(update={"auto_augment": "trivialaugment", "re_prob": 0.1,
                                                  "scale": (0.35, 1.0)})
    return cfg.model_copy(update={
        "freeze": policy,
        "data": cfg.data.model_copy(update={"augment": augment}),
        "train": cfg.train.model_copy(update={"epochs": 15, "lr": 2e-3, "weight_decay": 0.05, "warmup_epochs": 1.0,
                                              "label_smoothing": 0.1, "ema_decay": 0.998,
                                              "class_weights": "balanced", "unfreeze_warmup_epochs": 1.0}),
    })


def _lp_ft(cfg: RunConfig) -> RunConfig:
    # LP-FT (Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
    # Out-of-Distribution", ICLR 2022): fit the new head to convergence on frozen features first
    # (5 epochs from cached features of the eval view: the backbone runs once), then fine-tune the
    # last four stages with smaller steps (backbone LRs x0.3, layer-wise decay 0.6, a one-epoch
    # ramp), so that a random head's large early gradients never reach the pretrained features.
    policy = FreezePolicy.linear_probe(batchnorm="frozen").then(5, depth=-5, layer_decay=0.6, backbone_lr_scale=0.3)
    augment = cfg.data.augment.model_copy(update={"auto_augment": "trivialaugment", "re_prob": 0.1,
                                                  "scale": (0.35, 1.0)})
    return cfg.model_copy(update={
        "freeze": policy,
        "data": cfg.data.model_copy(update={"augment": augment}),
        "train": cfg.train.model_copy(update={"epochs": 15, "lr": 2e-3, "weight_decay": 0.05, "warmup_epochs": 1.0,
                                              "label_smoothing": 0.1, "feature_cache": True,
                                              "class_weights": "balanced", "unfreeze_warmup_epochs": 1.0}),
    })


def _scratch(cfg: RunConfig) -> RunConfig:
    # Random initialisation, every parameter and BatchNorm trains, same budget as "finetune".
    return cfg.model_copy(update={
        "backbone": cfg.backbone.model_copy(update={"pretrained": False, "weights": None}),
        "freeze": FreezePolicy.full_finetune(),
        "train": cfg.train.model_copy(update={"epochs": 12, "lr": 2e-3, "weight_decay": 0.05, "warmup_epochs": 1.0,
                                              "label_smoothing": 0.1}),
    })


def _auto(cfg: RunConfig) -> RunConfig:
    # The lp-ft schedule, adapted to the data when the run starts (adapt_to_data).
    out = _lp_ft(cfg)
    return out.model_copy(update={"train": out.train.model_copy(update={"auto": True})})


FEW_PER_CLASS = 20
"""Below this many training images per class, ``auto`` trains a linear probe only (fine-tuning
a network on a handful of photos per class overfits; the probe is also the fastest)."""


def adapt_to_data(config: RunConfig, train: Sized) -> RunConfig:
    """The ``auto`` recipe's choices for this training data (what `tlkit.run.prepare_run` records).

    Rules (AutoGluon's idea of presets that choose for the user; numbers measured on TrashNet,
    see docs/recipes.md):

    * fewer than `FEW_PER_CLASS` images per class: a linear probe only (cached features, 30 cheap
      epochs), no unfreezing;
    * otherwise LP-FT (`lp-ft`): 5 head-only epochs from cached features, then the last four
      stages, ``round(15 * sqrt(1600 / N))`` epochs in all, clamped to [8, 30]: as many optimizer
      steps as TrashNet's 15 epochs of 1,600 photos, discounted for larger sets;
    * ``train.time_budget`` (if set) then stops the run within its budget.

    Args:
        config: a config made by the ``auto`` recipe (``train.auto``); others are returned as they are.
        train: the training data (its length and ``classes``).
    """
    import math

    if not config.train.auto:
        return config
    n, c = len(train), max(len(getattr(train, "classes", [])), 1)
    if n / c < FEW_PER_CLASS:
        probe = _linear_probe(config)
        return probe.model_copy(update={
            "backbone": config.backbone,  # the probe's portrait view is TrashNet's, not every dataset's
            "train": probe.train.model_copy(update={"epochs": 30, "auto": True, "num_workers": config.train.num_workers,
                                                    "time_budget": config.train.time_budget})})
    epochs = min(30, max(8, round(15 * math.sqrt(1600 / n))))
    return config.model_copy(update={"train": config.train.model_copy(update={"epochs": epochs})})


RECIPES: dict[str, Callable[[RunConfig], RunConfig]] = {
    "auto": _auto,
    "linear-probe": _linear_probe,
    "finetune": _finetune,
    "finetune-strong": _finetune_strong,
    "lp-ft": _lp_ft,
    "scratch": _scratch,
}
"""Recipe name -> function that returns a RunConfig with that recipe's settings."""


def apply_recipe(config: RunConfig, name: str) -> RunConfig:
    """Return a copy of ``config`` with the named recipe's freeze policy and loop settings.

    Recipes:
        ``linear-probe``: backbone frozen, new head trained from cached features (the backbone
        runs once, on the whole frame at 448 x 336: `PROBE_VIEW`, with `PROBE_WORKERS` loader
        workers), 15 epochs, AdamW lr 1e-3.
        ``finetune``: 2 epochs head warm-up, then the last 4 stages unfrozen with layer-wise LR
        decay 0.6, BatchNorm frozen, 12 epochs, AdamW lr 2e-3.
        ``finetune-strong``: the ``finetune`` phases, 15 epochs, TrivialAugment + random
        erasing, EMA of the weights (0.998), balanced class weights, weight decay 0.05, a
        one-epoch LR ramp for the stages unfrozen at epoch 2.
        ``auto``: ``lp-ft`` fitted to the data when the run starts (`adapt_to_data`: a linear
        probe for few images per class, else epochs by dataset size), within ``train.time_budget``.
        ``lp-ft``: LP-FT (Kumar et al. 2022): 5 head-only epochs from cached features, then
        the last 4 stages at backbone LR x0.3 with layer-wise decay 0.6, 15 epochs, the
        ``finetune-strong`` augmentation and class weights.
        ``scratch``: random init, everything trains, 12 epochs.

    Raises:
        ValueError: unknown recipe name.
    """
    try:
        return RECIPES[name](config)
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}") from None
