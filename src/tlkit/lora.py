"""LoRA adapters for parameter-efficient fine-tuning, on top of the ``peft`` library.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a linear
layer's weight ``W`` (``out x in``) and learns ``W + (alpha / rank) * B @ A`` with ``A``
(``rank x in``, Kaiming-uniform init) and ``B`` (``out x rank``, zero init), so training starts
from the pretrained function and only ``rank * (in + out)`` numbers per layer train. tlkit puts
the adapters in with peft's ``inject_adapter_in_model`` (the model stays a timm model: its
``forward_features``, ``get_classifier`` and ``group_matcher`` keep working) on the attention
and MLP linears of ViT-style blocks (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``: the
names timm's ViT, DeiT, Swin, EVA and BEiT share); the classifier is never adapted.

Checkpoints keep the adapters separate (``...qkv.base_layer.weight``, ``...qkv.lora_A.default.weight``),
so a run resumes bit for bit; every export (ONNX, INT8, torch.export, TorchScript, plain timm
folders) gets `merged_copy`: each adapter folded into its base weight, no peft needed to run it.
"""

from __future__ import annotations

import copy
import re

from pydantic import Field, field_validator
from torch import nn

from tlkit._strict import StrictModel

__all__ = ["LoraSettings", "has_lora", "inject_lora", "lora_param_names", "merged_copy"]

VIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


class LoraSettings(StrictModel):
    """Where LoRA adapters go and their size (a `FreezePolicy` field: ``FreezePolicy(lora=...)``).

    Defaults follow the LoRA paper's ViT-scale settings as peft's examples use them for image
    classification (rank 8, ``alpha = 2 * rank``); the paper finds ranks 4-16 enough.
    """

    rank: int = Field(8, ge=1, le=256, description="Rank r of each adapter (B is out x r, A is r x in).")
    alpha: float = Field(16.0, gt=0.0, le=4096.0, description="Scale: the update is (alpha / rank) * B @ A.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input while training.")
    targets: list[str] = Field(
        default_factory=lambda: list(VIT_TARGETS), min_length=1, max_length=16,
        description="Module names (or name suffixes after a dot) of the nn.Linear layers to adapt.")

    @field_validator("targets")
    @classmethod
    def _plain_names(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if len(t) > 100 or not _MODULE_NAME.match(t)]
        if bad:
            raise ValueError(f"{bad}: targets are dotted module names such as 'attn.qkv'")
        return v


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError('LoRA needs the peft package: pip install "tlkit[peft]"') from e
    return peft


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds peft LoRA layers (False, without importing peft, if it is not installed)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return any(isinstance(m, LoraLayer) for m in model.modules())


def lora_param_names(model: nn.Module) -> set[str]:
    """Names of the adapter parameters (``lora_A`` / ``lora_B``) in ``model``."""
    return {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def inject_lora(model: nn.Module, settings: LoraSettings, exclude: list[str] | None = None) -> nn.Module:
    """Put LoRA adapters into ``model`` in place (once: a model that has them is returned as it is).

    Args:
        model: a timm model (with its new head).
        settings: rank, alpha, dropout and target module names.
        exclude: module names never adapted (the classifier's).

    Returns:
        ``model``.

    Raises:
        ImportError: peft is missing.
        ValueError: no ``nn.Linear`` of ``model`` matches ``settings.targets`` (names the targets
            and a few linear layers the model has).
    """
    if has_lora(model):
        return model
    peft = _peft()
    skip = tuple(exclude or [])
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and not any(n == e or n.startswith(e + ".") for e in skip)]
    hits = [n for n in linears if any(n == t or n.endswith("." + t) for t in settings.targets)]
    if not hits:
        raise ValueError(f"FreezePolicy.lora.targets {settings.targets} match no nn.Linear of this model "
                         f"(it has e.g. {linears[:4]}); name the layers to adapt")
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=hits, bias="none")
    return peft.inject_adapter_in_model(config, model)


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every LoRA adapter merged into its base layer (plain modules).

    The copy computes the same function (up to float rounding) and has the parameter names of the
    model before `inject_lora`; ``model`` itself is not changed. A model without adapters is
    copied as it is.
    """
    out = copy.deepcopy(model)
    if not has_lora(out):
        return out
    from peft.tuners.lora import LoraLayer

    layers = [(name, m) for name, m in out.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, layer.get_base_layer())
    return out
