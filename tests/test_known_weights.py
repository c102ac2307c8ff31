"""Weight files with known preprocessing: recognised by content, filled in, contradictions warned."""

import shutil
import warnings
from pathlib import Path

import pytest

from tlkit import BackboneConfig, create_backbone, resolve_data_config
from tlkit._known_weights import KNOWN_WEIGHTS, PreprocessingWarning, known_weights, with_known_weights

SHIPPED = Path(__file__).resolve().parents[1] / "examples/garbage/weights/mobilenetv2_100_tf_qat_dequant.safetensors"


def test_the_shipped_mobilenetv2_file_brings_pad_type_and_its_normalisation(tmp_path):
    copy = tmp_path / "renamed.safetensors"  # recognised by content, not by name
    shutil.copy(SHIPPED, copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = create_backbone(BackboneConfig(name="mobilenetv2_100", weights=copy))
    config = model.tlkit_backbone_config
    assert config.model_kwargs == {"pad_type": "same"}
    data = resolve_data_config(model, config.data_config)
    assert data["mean"] == [0.5, 0.5, 0.5] and data["std"] == [0.5, 0.5, 0.5]  # timm's own cfg says ImageNet's
    assert data["interpolation"] == "bicubic" and data["crop_pct"] == 0.875


def test_a_contradicting_setting_is_kept_with_a_warning():
    config = BackboneConfig(name="mobilenetv2_100", weights=SHIPPED, data_config={"mean": (0.485, 0.456, 0.406)})
    with pytest.warns(PreprocessingWarning, match=r"expects mean=\(0.5, 0.5, 0.5\), but mean=\(0.485"):
        out = with_known_weights(config)
    assert out.data_config.mean == (0.485, 0.456, 0.406) and out.data_config.std == (0.5, 0.5, 0.5)


def test_other_files_and_other_architectures_are_left_alone(tmp_path):
    other = tmp_path / "w.safetensors"
    other.write_bytes(b"x" * next(iter(KNOWN_WEIGHTS))[0])  # a known size, other content
    assert known_weights(other) is None
    assert known_weights(tmp_path / "missing.safetensors") is None
    config = BackboneConfig(name="mobilenetv2_140", weights=SHIPPED)  # the file fits another model
    assert with_known_weights(config) == config
    assert with_known_weights(BackboneConfig(name="mobilenetv2_100", pretrained=False, weights=SHIPPED)).model_kwargs == {}
