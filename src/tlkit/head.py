"""Replace the pretrained classifier of any timm model with a new task head."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from tlkit._introspect import architecture_name as _arch
from tlkit._introspect import classifier_module_names, classifier_param_names
from tlkit._meta import MetaValuesSkipped
from tlkit.config import HeadConfig

__all__ = ["HeadReplacer", "TaskHead", "check_head_width", "classifier_module_names", "classifier_param_names",
           "head_config_for", "head_width"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class TaskHead(nn.Module):
    """Dropout -> [Linear -> activation -> Dropout] -> Linear, the head made by `HeadReplacer`.

    Input ``(B, in_features)``, or ``(B, in_features, 1, 1)`` where the model's classifier is a
    1x1 convolution (then the output is ``(B, num_classes, 1, 1)`` so the model's own flatten
    still applies). Output: logits ``(B, num_classes)``, same dtype as the input.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        dropout: float = 0.0,
        hidden_dim: int | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.drop = nn.Dropout(dropout)
        if hidden_dim is not None:
            self.hidden = nn.Linear(in_features, hidden_dim)
            self.act = _ACTIVATIONS[activation]()
            self.drop_hidden = nn.Dropout(dropout)
            in_features = hidden_dim
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        spatial = x.ndim == 4
        if spatial:
            x = x.flatten(1)
        x = self.drop(x)
        if hasattr(self, "hidden"):
            x = self.drop_hidden(self.act(self.hidden(x)))
        x = self.fc(x)
        return x[:, :, None, None] if spatial else x


def _in_features(module: nn.Module, model: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels
    if isinstance(module, TaskHead):
        return module.in_features
    # nn.Identity (num_classes=0): the classifier's input is the pooled feature width.
    return getattr(model, "head_hidden_size", None) or model.num_features


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


class HeadReplacer:
    """Swap the classifier of a timm model for a new head with ``num_classes`` outputs.

    The classifier is found through timm's ``get_classifier()`` (``classifier``, ``fc``, ``head``,
    ``head.fc``, or both heads of a distilled model) and replaced in place, so the pooling and
    norm layers before it, ``forward_features`` and ``forward_head(x, pre_logits=True)`` are
    untouched. With no dropout and no hidden layer the new head is a plain ``nn.Linear``, so
    parameter names stay timm's (``classifier.weight``); otherwise a `TaskHead`.

    The new layers are initialised (PyTorch's default initialisation) from their own random
    generator seeded with ``seed``, so the same call gives the same head whatever ran before,
    and the caller's random state is left as it was; ``seed=None`` draws from torch's global
    generator instead.

    Example:
        >>> model = timm.create_model("resnet18")
        >>> model = HeadReplacer(num_classes=6, dropout=0.2).apply(model)
        >>> model(torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 6])
    """

    def __init__(
        self,
        num_classes: int,
        dropout: float = 0.0,
        hidden_dim: int | None = None,
        activation: str = "relu",
        head_layers: str = "keep",
        seed: int | None = 0,
    ) -> None:
        self.config = HeadConfig(
            num_classes=num_classes, dropout=dropout, hidden_dim=hidden_dim, activation=activation,
            head_layers=head_layers,
        )
        self.seed = seed

    @classmethod
    def from_config(cls, config: HeadConfig, num_classes: int | None = None, seed: int | None = 0) -> HeadReplacer:
        """Build from a `HeadConfig`; ``num_classes`` fills in a config that left it ``None``.

        Raises:
            ValueError: neither gives a class count.
        """
        n = config.num_classes or num_classes
        if n is None:
            raise ValueError("HeadConfig.num_classes is not set and no class count was given")
        return cls(n, config.dropout, config.hidden_dim, config.activation, config.head_layers, seed=seed)

    def build(self, in_features: int) -> nn.Module:
        """A fresh head for ``in_features`` inputs (PyTorch's default Linear initialisation)."""
        c = self.config
        if c.dropout == 0.0 and c.hidden_dim is None:
            return nn.Linear(in_features, c.num_classes)
        return TaskHead(in_features, c.num_classes, c.dropout, c.hidden_dim, c.activation)

    def apply(self, model: nn.Module) -> nn.Module:
        """Replace the classifier(s) of ``model`` in place and return ``model``.

        timm's contract decides what the classifiers are: ``reset_classifier(num_classes)`` runs
        first on a weightless copy of the model (``meta`` tensors), and every Linear or 1x1
        convolution it creates with ``num_classes`` outputs is a classifier: lists of heads
        (CrossViT), heads that own their pooling (``ClassifierHead``), distillation and
        auxiliary heads (DeiT ``head_dist``, VOLO ``aux_head``). Each is swapped for a new
        layer; with ``head_layers="keep"`` the pretrained layers around it stay (the BatchNorm
        of LeViT's ``NormLinear``, ``fc1``/``norm`` of an MLP head, the pooling), with
        ``"reset"`` timm's own ``reset_classifier`` rebuilds those first (fresh init). Models
        without ``reset_classifier`` fall back to ``get_classifier()`` and
        ``pretrained_cfg["classifier"]``.

        The new layers are created on the device and dtype of the old classifier (or of the
        first model parameter), are trainable and carry a ``_tlkit_head`` mark (see
        `classifier_module_names`). ``model.num_classes`` is updated.

        Returns:
            The same model; its forward returns logits ``(B, num_classes)``.

        Raises:
            ValueError: naming the model and the module, where the classifier cannot be found
                or is a layer tlkit cannot rebuild (a convolution wider than 1x1).
        """
        with _head_rng(self.seed, next(model.parameters(), None)):
            return self._apply(model)

    def _apply(self, model: nn.Module) -> nn.Module:
        names = _classifier_targets(model, self.config.num_classes, self.config.head_layers)
        ref = next(model.parameters(), None)
        for name, in_features in names:
            old = model.get_submodule(name)
            if isinstance(old, nn.Conv2d) and old.kernel_size != (1, 1):
                raise ValueError(f"{_arch(model)}: classifier {name!r} is a {old.kernel_size} convolution; "
                                 "tlkit replaces Linear and 1x1 convolution classifiers only")
            new = self.build(in_features)
            src = next(old.parameters(), ref)
            if src is not None:
                new = new.to(device=src.device, dtype=src.dtype)
            if isinstance(old, nn.Conv2d) and isinstance(new, nn.Linear):
                new = TaskHead(new.in_features, new.out_features).to(new.weight.device, new.weight.dtype)
            for p in new.parameters():
                p.requires_grad_(True)
            new._tlkit_head = True
            _set_submodule(model, name, new)
            _set_num_classes(model, name, self.config.num_classes)
        return model


@contextlib.contextmanager
def _head_rng(seed: int | None, ref: torch.Tensor | None) -> Iterator[None]:
    """Run the head's initialisation under ``torch.manual_seed(seed)``, the caller's state restored."""
    if seed is None:
        yield
        return
    cuda = [ref.device] if ref is not None and ref.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _set_num_classes(model: nn.Module, name: str, num_classes: int) -> None:
    # The model and every module on the path to the new layer that records a class count.
    parts = name.split(".")
    for k in range(len(parts)):
        module = model.get_submodule(".".join(parts[:k])) if k else model
        if isinstance(getattr(module, "num_classes", None), int):
            module.num_classes = num_classes


def _meta_twin(model: nn.Module) -> nn.Module:
    """A structural copy of ``model``: every module copied, parameters and buffers as ``meta`` tensors.

    Each module is a shallow copy with its own child, parameter and buffer tables, so whatever
    ``reset_classifier`` replaces on the twin leaves the model as it was; the rest of a module's
    attributes are shared, not deep-copied (a deep copy of a large model's module tree cost more
    than finding its head).
    """
    tensors: dict[int, torch.Tensor] = {}

    def meta(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if id(t) not in tensors:  # a tied tensor stays one tensor in the twin
            m = torch.empty_like(t, device="meta")
            tensors[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
        return tensors[id(t)]

    copies = {id(m): copy.copy(m) for m in model.modules(remove_duplicate=False)}
    for m in model.modules():
        twin = copies[id(m)]
        twin._modules = {k: copies[id(c)] if c is not None else None for k, c in m._modules.items()}
        twin._parameters = {k: meta(t) for k, t in m._parameters.items()}
        twin._buffers = {k: meta(t) for k, t in m._buffers.items()}
        twin._tlkit_twin = True
    return copies[id(model)]


def _out_width(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return m.out_channels
    return None


def _in_width(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _reset_targets(model: nn.Module, num_classes: int) -> list[tuple[str, int]]:
    # Run timm's reset_classifier on a weightless twin; the layers it creates with num_classes
    # outputs are the classifiers (timm knows its heads better than any name heuristic).
    twin = _meta_twin(model)
    with torch.device("meta"), MetaValuesSkipped():  # the new layers' shapes matter, not their values
        twin.reset_classifier(num_classes)
    return [(n, _in_width(m)) for n, m in twin.named_modules()
            if not getattr(m, "_tlkit_twin", False) and _out_width(m) == num_classes]


def _classifier_targets(model: nn.Module, num_classes: int, head_layers: str) -> list[tuple[str, int]]:
    """``(module name, input width)`` of every classifier layer to replace."""
    if callable(getattr(model, "reset_classifier", None)):
        try:
            targets = _reset_targets(model, num_classes)
        except Exception as e:  # noqa: BLE001 - any failure of a model's own reset is reported with its name
            raise ValueError(f"{_arch(model)}: reset_classifier({num_classes}) failed on a weightless copy: "
                             f"{type(e).__name__}: {e}") from None
        if not targets:
            raise ValueError(f"{_arch(model)}: reset_classifier({num_classes}) created no Linear or convolution "
                             f"with {num_classes} outputs, so tlkit cannot tell its classifier")
        modules = dict(model.named_modules())
        if head_layers == "keep" and all(n in modules for n, _ in targets):
            return targets + _leftover_heads(model, {n for n, _ in targets})
        ref = next(model.parameters(), None)
        with torch.device(ref.device if ref is not None else "cpu"):
            model.reset_classifier(num_classes)  # timm rebuilds its head wrappers (fresh init)
        return targets
    names = classifier_module_names(model)
    return [(n, _in_features(model.get_submodule(n), model)) for n in names]


def _leftover_heads(model: nn.Module, targets: set[str]) -> list[tuple[str, int]]:
    # Layers inside the model's declared classifier that still have the old class count and
    # that reset_classifier's defaults skip (RepViT's reset drops its distillation head; kept
    # here, it must be resized too).
    old = getattr(model, "num_classes", None)
    try:
        declared = classifier_module_names(model)
    except ValueError:
        return []
    return [(n, _in_width(m)) for n, m in model.named_modules()
            if n not in targets and _out_width(m) == old and any(n.startswith(d + ".") for d in declared)]


def head_width(model: nn.Module) -> int | None:
    """Number of outputs of the model's classifier(s), or ``None`` when it has none (``Identity``).

    Raises:
        ValueError: its classifiers disagree (one resized, another still at the old width).
    """
    try:
        names = classifier_module_names(model)
    except ValueError:
        return None
    widths = set()
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, TaskHead):
            widths.add(module.num_classes)
            continue
        leaves = [w for m in module.modules() if (w := _out_width(m)) is not None]
        if leaves:
            widths.add(leaves[-1])
    if len(widths) > 1:
        raise ValueError(f"{_arch(model)}: its classifiers {names} have different widths {sorted(widths)}")
    return widths.pop() if widths else None


def check_head_width(model: nn.Module, classes: list[str]) -> None:
    """Raise unless the model's classifier has ``len(classes)`` outputs.

    Raises:
        ValueError: naming the model, both numbers and the fix.
    """
    width = head_width(model)
    if width is not None and width != len(classes):
        raise ValueError(f"{_arch(model)}: its classifier has {width} outputs but {len(classes)} class names were "
                         f"given; replace it first: HeadReplacer(num_classes={len(classes)}).apply(model)")


def head_config_for(model: nn.Module, classes: list[str], head: HeadConfig | None = None) -> HeadConfig:
    """The head config of ``model`` for ``classes``: ``head`` completed, or read off a `TaskHead`.

    Raises:
        ValueError: fewer than 2 classes, or a ``head.num_classes`` that is not ``len(classes)``.
    """
    if len(classes) < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {classes}: add a folder per class")
    head = head or _read_head_config(model)
    if head.num_classes is None:
        head = head.model_copy(update={"num_classes": len(classes)})
    if head.num_classes != len(classes):
        raise ValueError(f"head has {head.num_classes} classes but {len(classes)} class names were given")
    return head


def _read_head_config(model: nn.Module) -> HeadConfig:
    head = model.get_submodule(classifier_module_names(model)[0])
    if not isinstance(head, TaskHead):
        return HeadConfig()
    hidden = head.hidden.out_features if hasattr(head, "hidden") else None
    act = next((k for k, v in {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}.items()
                if hasattr(head, "act") and isinstance(head.act, v)), "relu")
    return HeadConfig(dropout=head.drop.p, hidden_dim=hidden, activation=act)
