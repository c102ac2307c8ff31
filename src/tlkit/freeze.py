"""Which parameters train, and when: freeze depth, name patterns, BatchNorm policy, phases, LRs.

A `FreezePolicy` is data (a pydantic model, serialisable into configs and checkpoints) plus
pure functions of ``(model, epoch)``:

* `FreezePolicy.trainable_names` - the exact set of parameter names that train,
* `FreezePolicy.frozen_batchnorm_names` - the BatchNorm modules held in eval mode,
* `FreezePolicy.param_groups` - optimizer parameter groups with their learning rates.

`FreezePolicy.apply` is the only place in tlkit that sets ``requires_grad``.

Depth counts stages (`tlkit.stages.parameter_groups`: timm's own stage grouping with the
classifier split off as a final ``head`` group), so an integer depth means the same thing on
every family (fastai's ``freeze_to`` semantics).
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tlkit._introspect import architecture_name, batchnorm_modules, classifier_module_names
from tlkit._strict import StrictModel
from tlkit.lora import LoraSettings, inject_lora, lora_param_names
from tlkit.schedule import cosine_lr_factor  # noqa: F401  (its old home; tlkit.schedule owns it)
from tlkit.stages import ParamGroup, parameter_groups

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
    batchnorm: BatchNormPolicy | None = Field(None, description="New BatchNorm policy (see FreezePolicy.batchnorm).")
    layer_decay: float | None = Field(None, gt=0.0, le=1.0, description="New layer-wise LR decay, in (0, 1].")
    backbone_lr_scale: float | None = Field(None, gt=0.0, description="New LR scale of every group but the head.")


def _no_decay(name: str, patterns: set[str]) -> bool:
    return name in patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


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

    ``lora`` adds LoRA adapters (`tlkit.lora`, on ``peft``) to the attention and MLP linears;
    they train in every phase, on top of what ``depth`` and the patterns train, so
    ``FreezePolicy.lora_finetune()`` (``depth=-1``) trains the adapters and the new head only.
    `prepare` puts the adapters into a model (`FineTuner` does it when it is built).
    """

    depth: int = Field(0, description="Groups frozen from the input side; negative: from the top.")
    freeze: list[str] = Field(default_factory=list, description="Glob patterns of names to freeze.")
    unfreeze: list[str] = Field(default_factory=list, description="Glob patterns to unfreeze (last).")
    batchnorm: BatchNormPolicy = Field(
        "follow", description="BatchNorm layers: 'follow' (train mode where their group trains), 'frozen' (always "
        "eval: running statistics never move), 'trainable' (always train mode).")
    layer_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="Layer-wise LR decay: group i of n gets lr * layer_decay ** (n - 1 - i).")
    backbone_lr_scale: float = Field(1.0, gt=0.0, description="LR multiplier of every group but the head.")
    phases: list[Phase] = Field(
        default_factory=list, description="Changes at given epochs (progressive unfreezing): a list of "
        "{epoch, depth, freeze, unfreeze, batchnorm, layer_decay, backbone_lr_scale}.")
    lora: LoraSettings | None = Field(None, description="LoRA adapters on the backbone's linears (needs peft).")

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

    @classmethod
    def lora_finetune(cls, rank: int = 8, alpha: float | None = None, **kwargs) -> FreezePolicy:
        """LoRA adapters of rank ``rank`` (``alpha`` default ``2 * rank``) and the new head train; nothing else.

        Other `LoraSettings` fields (``targets``, ``dropout``) go in ``lora={...}`` instead.
        """
        lora = LoraSettings(rank=rank, alpha=2.0 * rank if alpha is None else alpha)
        return cls(depth=kwargs.pop("depth", -1), lora=kwargs.pop("lora", lora), **kwargs)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Put the policy's LoRA adapters into ``model`` (in place, once); without ``lora``, nothing.

        Raises:
            ImportError / ValueError: as `tlkit.lora.inject_lora`.
        """
        if self.lora is not None:
            inject_lora(model, self.lora, exclude=classifier_module_names(model))
        return model

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

    def check_epochs(self, epochs: int) -> None:
        """Fail if a phase starts at or after the last epoch of an ``epochs``-long run (it would never run).

        Raises:
            ValueError: names the phase's first epoch (1-based) and the fix.
        """
        late = [e for e in self.boundaries() if e >= epochs]
        if late:
            raise ValueError(f"train.epochs is {epochs}, so the freeze phase that starts at epoch {late[0] + 1} "
                             f"never runs; set train.epochs to at least {late[-1] + 1}, or start the phase earlier")

    def trainable_names(self, model: nn.Module, epoch: int = 0) -> set[str]:
        """The exact set of parameter names that train at ``epoch``.

        Raises:
            ValueError: no parameter would train, or a pattern matches no parameter name.
        """
        return self._trainable_names(model, epoch, parameter_groups(model))

    def _trainable_names(self, model: nn.Module, epoch: int, groups: list[ParamGroup]) -> set[str]:
        s = self.at(epoch)
        names = [n for n, _ in model.named_parameters()]
        if s.depth < 0 and (not groups or groups[-1].name != "head"):
            raise ValueError(
                f"FreezePolicy(depth={s.depth}) counts from the head, but {architecture_name(model)} "
                "has no classifier (an encoder-only model?): add one with HeadReplacer, or freeze with a depth >= 0")
        k = s.depth if s.depth >= 0 else max(len(groups) + s.depth, 0)
        trainable = {n for g in groups[k:] for n in g.param_names}
        trainable -= _match(s.freeze, names, "freeze")
        trainable |= _match(s.unfreeze, names, "unfreeze")
        trainable |= self._adapters(model)
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

    def _adapters(self, model: nn.Module) -> set[str]:
        adapters = lora_param_names(model)
        if self.lora is not None and not adapters:
            raise ValueError("FreezePolicy.lora is set but the model has no LoRA adapters: "
                             "call policy.prepare(model) first (FineTuner does)")
        if adapters and self.lora is None:
            raise ValueError("the model holds LoRA adapters but FreezePolicy.lora is not set: "
                             "use the policy the adapters were made with")
        return adapters

    def frozen_batchnorm_names(self, model: nn.Module, epoch: int = 0) -> set[str]:
        """Names of BatchNorm modules held in eval mode (running statistics frozen) at ``epoch``."""
        return self._frozen_batchnorm_names(model, epoch, None)

    def _frozen_batchnorm_names(self, model: nn.Module, epoch: int, trainable: set[str] | None) -> set[str]:
        s = self.at(epoch)
        bns = batchnorm_modules(model)
        if s.batchnorm == "frozen":
            return set(bns)
        if s.batchnorm == "trainable":
            return set()
        trainable = self.trainable_names(model, epoch) if trainable is None else trainable
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
        frozen_bn = self._frozen_batchnorm_names(model, epoch, trainable)
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
        return self._lr_scales(parameter_groups(model), epoch)

    def _lr_scales(self, groups: list[ParamGroup], epoch: int) -> dict[str, float]:
        s = self.at(epoch)
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
        groups = parameter_groups(model)  # the stages, computed once for the whole call
        trainable = self._trainable_names(model, epoch, groups)
        if only is not None:
            trainable &= only
        scales = self._lr_scales(groups, epoch)
        params = dict(model.named_parameters())
        # timm matches no_weight_decay() names as fnmatch patterns ("pos_embed.*", XCiT).
        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        out = []
        for g in groups:
            for decay in (True, False):
                names = [
                    n for n in g.param_names if n in trainable
                    and ((params[n].ndim > 1 and not _no_decay(n, skip) and not n.endswith(".bias")) == decay)
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
