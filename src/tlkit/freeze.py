"""Which parameters train, and when: freeze depth, name patterns, BatchNorm policy, phases, LRs.

A `FreezePolicy` is data (a pydantic model, serialisable into configs and checkpoints) plus
pure functions of ``(model, epoch)``:

* `FreezePolicy.trainable_names` - the exact set of parameter names that train,
* `FreezePolicy.frozen_batchnorm_names` - the BatchNorm modules held in eval mode,
* `FreezePolicy.param_groups` - optimizer parameter groups with their learning rates.

`FreezePolicy.apply` is the only place in tlkit that sets ``requires_grad``.

Parameter groups ("stages") come from timm's own ``group_matcher(coarse=True)`` via
``timm.models.group_parameters``, with the classifier split off as a final ``head`` group, so an
integer depth means the same thing on every family (fastai's ``freeze_to`` semantics).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tlkit._introspect import batchnorm_modules, classifier_param_names
from tlkit._strict import StrictModel
from tlkit.schedule import cosine_lr_factor  # noqa: F401  (its old home; tlkit.schedule owns it)

__all__ = [
    "Phase",
    "FreezePolicy",
    "ParamGroup",
    "parameter_groups",
    "batchnorm_modules",
    "BatchNormPolicy",
]

BatchNormPolicy = Literal["follow", "frozen", "trainable"]
"""How BatchNorm layers are treated.

* ``"follow"``: a BatchNorm layer trains (affine and running statistics) when its parameters are
  trainable; when they are frozen it is held in eval mode, so its running statistics never move.
* ``"frozen"``: every BatchNorm layer is frozen and held in eval mode, whatever the depth. Needed
  for weights with BatchNorm folded into the convolutions, and common for small-batch fine-tunes.
* ``"trainable"``: every BatchNorm layer trains, also inside frozen groups (fastai's and
  Lightning's ``train_bn=True``).
"""


class Phase(StrictModel):
    """A change of the policy at the start of ``epoch``; fields left ``None`` keep their value.

    Example: ``Phase(epoch=2, depth=-4, layer_decay=0.6)`` unfreezes the last three groups
    below the head at epoch 2 with layer-wise decayed learning rates.
    """

    epoch: int = Field(..., ge=1, description="0-based epoch at whose start the phase begins.")
    depth: int | None = Field(None, description="New freeze depth (see FreezePolicy.depth).")
    freeze: list[str] | None = Field(None, description="New freeze patterns (replace the old list).")
    unfreeze: list[str] | None = Field(None, description="New unfreeze patterns.")
    batchnorm: BatchNormPolicy | None = None
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    backbone_lr_scale: float | None = Field(None, gt=0.0)


@dataclass(frozen=True)
class ParamGroup:
    """One stage of a model: a name and its parameter names, in model order."""

    name: str
    param_names: tuple[str, ...]


def _module_label(names: list[str], all_names: list[str]) -> str:
    # The shortest prefix of the names' common module that holds no parameter outside `names`
    # ("layer1" rather than "layer1.0", "stages.0" rather than "stages.0.blocks").
    split = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    inside = set(names)
    for k in range(1, len(common) + 1):
        prefix = ".".join(common[:k]) + "."
        if all(n in inside for n in all_names if n.startswith(prefix)):
            return prefix[:-1]
    return ".".join(common)


def _group_label(names: list[str], all_names: list[str]) -> str:
    # One module ("blocks.3", "layer1"), else one per top-level module joined by "+"
    # ("conv_stem+bn1", "blocks.6+conv_head+bn2").
    label = _module_label(names, all_names)
    if label:
        return label
    by_top: dict[str, list[str]] = {}
    for n in names:
        by_top.setdefault(n.split(".")[0], []).append(n)
    return "+".join(_module_label(v, all_names) or k for k, v in by_top.items())


def parameter_groups(model: nn.Module) -> list[ParamGroup]:
    """Split a model's parameters into ordered groups, input side first, ``head`` last.

    Uses the model's ``group_matcher(coarse=True)`` (timm's stage-level grouping) when it has
    one, else one group per top-level child module. The classifier (``get_classifier()``) always
    forms the final group named ``"head"``; a group emptied by that split is dropped.

    Args:
        model: a timm model (any ``nn.Module`` works through the fallback).

    Returns:
        Groups in forward order; every parameter appears in exactly one group.
    """

    all_names = [n for n, _ in model.named_parameters()]
    head = set(classifier_param_names(model))
    raw: list[list[str]] = []
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        from timm.models import group_parameters

        try:
            grouped = group_parameters(model, matcher(coarse=True))
            raw = [list(v) for _, v in sorted(grouped.items())]
        except NotImplementedError:
            raw = []
    if not raw:
        by_child: dict[str, list[str]] = {}
        for n in all_names:
            by_child.setdefault(n.split(".")[0], []).append(n)
        raw = list(by_child.values())
    order = {n: i for i, n in enumerate(all_names)}
    groups = []
    used = {"head"}
    for names in raw:
        body = sorted((n for n in names if n not in head), key=order.__getitem__)
        if body:
            label = _group_label(body, all_names)
            if label in used:
                label = f"{label}#{len(groups)}"
            used.add(label)
            groups.append(ParamGroup(label, tuple(body)))
    if head:
        groups.append(ParamGroup("head", tuple(n for n in all_names if n in head)))
    return groups


def _hold_eval(module: nn.Module, args: tuple) -> None:
    # Forward pre-hook: a frozen BatchNorm normalises with its running statistics and never
    # updates them, even after model.train() flipped it back to training mode.
    if getattr(module, "_tlkit_frozen_bn", False):
        module.training = False


def _match(patterns: list[str], names: list[str], what: str) -> set[str]:
    out: set[str] = set()
    for pattern in patterns:
        hit = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hit:
            raise ValueError(
                f"{what} pattern {pattern!r} matches no parameter name "
                f"(names look like {names[0]!r} ... {names[-1]!r})"
            )
        out |= hit
    return out


class FreezePolicy(StrictModel):
    """Which parameters train at each epoch, how BatchNorm behaves, and the LR of each group.

    ``depth`` counts parameter groups (stages, see `parameter_groups`) frozen from the
    input side, as fastai's ``Learner.freeze_to``: ``0`` trains everything (full fine-tune),
    ``k > 0`` freezes the first ``k`` groups, ``-k`` leaves only the last ``k`` groups trainable,
    so ``-1`` is a linear probe (head only). Then ``freeze`` patterns freeze more and
    ``unfreeze`` patterns unfreeze, matched with `fnmatch.fnmatchcase` against parameter
    names (``"blocks.6.*"``, ``"*.bn*"``); a pattern that matches nothing is an error.

    Learning rates: group ``i`` of ``n`` gets ``lr * layer_decay ** (n - 1 - i)``, times
    ``backbone_lr_scale`` for every group but the head (layer-wise LR decay as in BEiT, Bao et
    al. 2021, and timm's ``param_groups_layer_decay``; discriminative LRs as in ULMFiT, Howard &
    Ruder 2018).

    ``phases`` change any of these at given epochs (progressive unfreezing).
    """

    depth: int = Field(0, description="Groups frozen from the input side; negative: from the top.")
    freeze: list[str] = Field(default_factory=list, description="Glob patterns of names to freeze.")
    unfreeze: list[str] = Field(default_factory=list, description="Glob patterns to unfreeze (last).")
    batchnorm: BatchNormPolicy = "follow"
    layer_decay: float = Field(1.0, gt=0.0, le=1.0)
    backbone_lr_scale: float = Field(1.0, gt=0.0)
    phases: list[Phase] = Field(default_factory=list)

    @model_validator(mode="after")
    def _phases_in_order(self) -> FreezePolicy:
        epochs = [p.epoch for p in self.phases]
        if epochs != sorted(set(epochs)):
            raise ValueError(f"phases must have strictly increasing epochs, got {epochs}")
        return self

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def linear_probe(cls, **kwargs) -> FreezePolicy:
        """Everything but the head frozen (``depth=-1``), BatchNorm held in eval mode."""
        return cls(depth=-1, **kwargs)

    @classmethod
    def full_finetune(cls, **kwargs) -> FreezePolicy:
        """Every parameter trains (``depth=0``)."""
        return cls(depth=0, **kwargs)

    @classmethod
    def freeze_to(cls, depth: int, **kwargs) -> FreezePolicy:
        """fastai's ``freeze_to(depth)``: freeze the first ``depth`` groups (negative: from the top)."""
        return cls(depth=depth, **kwargs)

    def then(self, epoch: int, **changes) -> FreezePolicy:
        """A copy with a `Phase` appended, e.g. ``.then(2, depth=-4, layer_decay=0.6)``."""
        return self.model_copy(update={"phases": [*self.phases, Phase(epoch=epoch, **changes)]})

    # -- pure functions of (model, epoch) ----------------------------------------------------
    def at(self, epoch: int) -> FreezePolicy:
        """The policy in force at ``epoch``: base settings overridden by every phase started."""
        settings = self.model_dump(exclude={"phases"})
        for phase in self.phases:
            if phase.epoch <= epoch:
                settings.update(phase.model_dump(exclude={"epoch"}, exclude_none=True))
        return FreezePolicy(**settings)

    def boundaries(self) -> list[int]:
        """Epochs at which a phase starts."""
        return [p.epoch for p in self.phases]

    def trainable_names(self, model: nn.Module, epoch: int = 0) -> set[str]:
        """The exact set of parameter names that train at ``epoch``.

        Raises:
            ValueError: no parameter would train, or a pattern matches no parameter name.
        """
        s = self.at(epoch)
        groups = parameter_groups(model)
        names = [n for n, _ in model.named_parameters()]
        k = s.depth if s.depth >= 0 else max(len(groups) + s.depth, 0)
        trainable = {n for g in groups[k:] for n in g.param_names}
        trainable -= _match(s.freeze, names, "freeze")
        trainable |= _match(s.unfreeze, names, "unfreeze")
        bn_params = {
            f"{m_name}.{p_name}" for m_name, m in batchnorm_modules(model).items()
            for p_name, _ in m.named_parameters(recurse=False)
        }
        if s.batchnorm == "frozen":
            trainable -= bn_params
        elif s.batchnorm == "trainable":
            trainable |= bn_params
        if not trainable:
            raise ValueError(
                f"FreezePolicy leaves no trainable parameter at epoch {epoch} "
                f"(depth={s.depth}, {len(groups)} groups: {[g.name for g in groups]}, "
                f"freeze={s.freeze}, batchnorm={s.batchnorm!r})"
            )
        return trainable

    def frozen_batchnorm_names(self, model: nn.Module, epoch: int = 0) -> set[str]:
        """Names of BatchNorm modules held in eval mode (running statistics frozen) at ``epoch``."""
        s = self.at(epoch)
        bns = batchnorm_modules(model)
        if s.batchnorm == "frozen":
            return set(bns)
        if s.batchnorm == "trainable":
            return set()
        trainable = self.trainable_names(model, epoch)
        return {
            n for n, m in bns.items()
            if any(f"{n}.{p}" not in trainable for p, _ in m.named_parameters(recurse=False))
        }

    def apply(self, model: nn.Module, epoch: int = 0) -> set[str]:
        """Set ``requires_grad`` and BatchNorm modes on ``model`` for ``epoch``, in place.

        Frozen parameters also lose their ``.grad`` so no optimizer moves them (AdamW and SGD
        skip parameters whose gradient is ``None``: no weight decay, no momentum). Frozen
        BatchNorm layers get a forward pre-hook that keeps them in eval mode even after a later
        ``model.train()``.

        Returns:
            The set of trainable parameter names.

        Raises:
            ValueError: as `trainable_names`.
        """
        trainable = self.trainable_names(model, epoch)
        frozen_bn = self.frozen_batchnorm_names(model, epoch)
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
            if name not in trainable:
                p.grad = None
        for name, m in batchnorm_modules(model).items():
            if _hold_eval not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_hold_eval)
            m._tlkit_frozen_bn = name in frozen_bn
            m.train(model.training and name not in frozen_bn)
        return trainable

    def lr_scales(self, model: nn.Module, epoch: int = 0) -> dict[str, float]:
        """Learning-rate multiplier of each parameter group (by group name) at ``epoch``."""
        s = self.at(epoch)
        groups = parameter_groups(model)
        n = len(groups)
        return {
            g.name: s.layer_decay ** (n - 1 - i) * (1.0 if g.name == "head" else s.backbone_lr_scale)
            for i, g in enumerate(groups)
        }

    def param_groups(
        self,
        model: nn.Module,
        epoch: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        only: set[str] | None = None,
    ) -> list[dict]:
        """Optimizer parameter groups for the parameters trainable at ``epoch``.

        Each stage gives up to two groups: with weight decay, and without it for biases,
        normalisation weights and the model's ``no_weight_decay()`` names (timm's convention).
        Every dict has ``params``, ``param_names``, ``group`` (stage name), ``lr_scale``, ``lr``
        (``lr * lr_scale``) and ``weight_decay``.

        Args:
            model: the model.
            epoch: 0-based epoch.
            lr: peak learning rate of the head.
            weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
            only: restrict to these parameter names (used to add newly unfrozen ones).
        """
        trainable = self.trainable_names(model, epoch)
        if only is not None:
            trainable &= only
        scales = self.lr_scales(model, epoch)
        params = dict(model.named_parameters())
        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        out = []
        for g in parameter_groups(model):
            for decay in (True, False):
                names = [
                    n for n in g.param_names if n in trainable
                    and ((params[n].ndim > 1 and n not in skip and not n.endswith(".bias")) == decay)
                ]
                if names:
                    out.append({
                        "params": [params[n] for n in names],
                        "param_names": names,
                        "group": g.name,
                        "lr_scale": scales[g.name],
                        "lr": lr * scales[g.name],
                        "weight_decay": weight_decay if decay else 0.0,
                    })
        return out

    def sync_optimizer(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, epoch: int, lr: float, weight_decay: float
    ) -> list[str]:
        """Bring an optimizer in line with the policy at a phase boundary.

        Parameters already in the optimizer keep their state (moments, momentum); their group's
        ``lr_scale`` takes the new value. Newly trainable parameters join as new groups with
        their own learning rate. Parameters frozen now stay in their groups without a gradient,
        so the optimizer skips them.

        Returns:
            Names of the parameters that joined the optimizer.
        """
        scales = self.lr_scales(model, epoch)
        present = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for g in optimizer.param_groups:
            g["lr_scale"] = scales.get(g["group"], g["lr_scale"])
            g["lr"] = lr * g["lr_scale"]
        new = {n for n, p in model.named_parameters() if id(p) not in present}
        joined = []
        if new & self.trainable_names(model, epoch):
            for group in self.param_groups(model, epoch, lr, weight_decay, only=new):
                optimizer.add_param_group(group)
                joined += group["param_names"]
        return joined
