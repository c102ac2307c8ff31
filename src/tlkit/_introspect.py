"""timm-contract lookups on a model: its classifier modules and parameters, its BatchNorm buffers.

A leaf module: it imports nothing from tlkit, so `tlkit.head`, `tlkit.freeze`, `tlkit.backbone`
and the training core can all use it without import cycles.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["architecture_name", "classifier_module_names", "classifier_param_names", "batchnorm_modules", "running_stats"]


def architecture_name(model: nn.Module) -> str:
    """The model's timm architecture (``pretrained_cfg["architecture"]``), else its class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def classifier_module_names(model: nn.Module) -> list[str]:
    """Dotted names of the classifier module(s) returned by ``model.get_classifier()``.

    Two names for distilled models (``head``, ``head_dist``). Falls back to
    ``pretrained_cfg["classifier"]`` for models whose ``get_classifier`` is missing. Layers
    `tlkit.HeadReplacer` put in (marked ``_tlkit_head``: every list head, auxiliary and
    distillation head) that lie outside those are added after them.

    Raises:
        ValueError: no classifier can be found.
    """
    marked = [n for n, m in model.named_modules() if n and getattr(m, "_tlkit_head", False)]
    try:
        declared = _declared_classifiers(model)
    except ValueError:
        if marked:
            return marked
        raise
    inside = lambda n, outer: n == outer or n.startswith(outer + ".")  # noqa: E731
    extra = [n for n in marked if not any(inside(n, d) for d in declared)]
    return [n for n in declared if not any(inside(n, o) and n != o for o in declared)] + extra


def _declared_classifiers(model: nn.Module) -> list[str]:
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        found = getter()
        targets = found if isinstance(found, (tuple, list)) else (found,)
        by_id = {id(m): n for n, m in model.named_modules() if n}
        names = [by_id[id(t)] for t in targets if id(t) in by_id]
        if len(names) == len(targets):
            return names
    cfg = getattr(model, "pretrained_cfg", None) or {}
    declared = cfg.get("classifier")
    if declared:
        declared = [declared] if isinstance(declared, str) else list(declared)
        modules = dict(model.named_modules())
        if all(n in modules for n in declared):
            return declared
    raise ValueError(
        f"cannot find the classifier of {type(model).__name__}: it has no get_classifier() "
        "and no pretrained_cfg['classifier'] naming a submodule"
    )


def classifier_param_names(model: nn.Module) -> list[str]:
    """Names of all parameters of the classifier module(s), in model order."""
    try:
        prefixes = tuple(f"{n}." for n in classifier_module_names(model))
    except ValueError:
        return []
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def batchnorm_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """All BatchNorm layers (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, timm's ``BatchNormAct2d``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def running_stats(model: nn.Module) -> list[torch.Tensor]:
    """The BatchNorm buffers a training forward pass changes (running mean, variance, count)."""
    return [t for m in batchnorm_modules(model).values()
            for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]
