"""Replace the pretrained classifier of any timm model with a new task head."""

from __future__ import annotations

from torch import nn

from tlkit._introspect import classifier_module_names, classifier_param_names
from tlkit.config import HeadConfig

__all__ = ["HeadReplacer", "TaskHead", "classifier_module_names", "classifier_param_names"]

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
    ) -> None:
        self.config = HeadConfig(
            num_classes=num_classes, dropout=dropout, hidden_dim=hidden_dim, activation=activation
        )

    @classmethod
    def from_config(cls, config: HeadConfig, num_classes: int | None = None) -> HeadReplacer:
        """Build from a `HeadConfig`; ``num_classes`` fills in a config that left it ``None``.

        Raises:
            ValueError: neither gives a class count.
        """
        n = config.num_classes or num_classes
        if n is None:
            raise ValueError("HeadConfig.num_classes is not set and no class count was given")
        return cls(n, config.dropout, config.hidden_dim, config.activation)

    def build(self, in_features: int) -> nn.Module:
        """A fresh head for ``in_features`` inputs (PyTorch's default Linear initialisation)."""
        c = self.config
        if c.dropout == 0.0 and c.hidden_dim is None:
            return nn.Linear(in_features, c.num_classes)
        return TaskHead(in_features, c.num_classes, c.dropout, c.hidden_dim, c.activation)

    def apply(self, model: nn.Module) -> nn.Module:
        """Replace the classifier(s) of ``model`` in place and return ``model``.

        The new head is created on the device and dtype of the old classifier (or of the first
        model parameter) and is trainable. ``model.num_classes`` is updated.

        Returns:
            The same model; its forward returns logits ``(B, num_classes)``.

        Raises:
            ValueError: the classifier cannot be found.
        """
        names = classifier_module_names(model)
        ref = next(model.parameters(), None)
        for name in names:
            old = model.get_submodule(name)
            new = self.build(_in_features(old, model))
            src = next(old.parameters(), ref)
            if src is not None:
                new = new.to(device=src.device, dtype=src.dtype)
            if isinstance(old, nn.Conv2d) and isinstance(new, nn.Linear):
                new = TaskHead(new.in_features, new.out_features).to(new.weight.device, new.weight.dtype)
            for p in new.parameters():
                p.requires_grad_(True)
            _set_submodule(model, name, new)
            parent_name = name.rpartition(".")[0]
            parent = model.get_submodule(parent_name) if parent_name else None
            if parent is not None and hasattr(parent, "num_classes"):
                parent.num_classes = self.config.num_classes
        if hasattr(model, "num_classes"):
            model.num_classes = self.config.num_classes
        return model
