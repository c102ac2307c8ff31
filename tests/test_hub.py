"""Plain-timm folders: written by save_pretrained, loaded by timm's local-dir: and by tlkit, untrusted on the way in."""

import json

import pytest
import timm
import torch
from conftest import tiny_tuner

from tlkit import FineTuner, HeadReplacer, TrainConfig
from tlkit.hub import load_pretrained, save_pretrained

CLASSES = ["cardboard", "glass", "metal"]


def _tuner(model_name="test_efficientnet", **head):
    torch.manual_seed(0)
    model = timm.create_model(model_name, pad_type="same")
    HeadReplacer(len(CLASSES), **head).apply(model)
    with torch.no_grad():  # not the init: the folder must carry trained weights
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    from tlkit import BackboneConfig

    backbone = BackboneConfig(name=model_name, pretrained=False, model_kwargs={"pad_type": "same"})
    data = {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3,
            "crop_pct": 1.0, "crop_mode": "squash"}
    return FineTuner(model, CLASSES, config=TrainConfig(device="cpu", progress=False), data_config=data,
                     backbone=backbone)


def test_plain_timm_loads_the_folder_with_classes_preprocessing_and_the_same_logits(tmp_path):
    tuner = _tuner(dropout=0.3)  # a dropout head: a TaskHead whose Linear becomes timm's classifier
    save_pretrained(tuner, tmp_path / "model")
    plain = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True).eval()
    assert plain.num_classes == 3 and plain.pretrained_cfg["label_names"] == CLASSES
    data = timm.data.resolve_data_config({}, model=plain)
    assert data["mean"] == [0.5] * 3 and data["std"] == [0.25] * 3 and data["crop_mode"] == "squash"
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_args"]["pad_type"] == "same"
    x = torch.randn(2, 3, 64, 64)
    tuner.model.eval()
    with torch.no_grad():
        expected = tuner.model(x)
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
        back = FineTuner.from_pretrained(tmp_path / "model", device="cpu")
        torch.testing.assert_close(back.model(x), expected, rtol=1e-5, atol=1e-5)
    assert back.classes == CLASSES and back.data_config == tuner.data_config
    assert back.backbone.model_kwargs["pad_type"] == "same"


def test_a_hidden_layer_head_is_refused_with_the_formats_that_can_carry_it(tmp_path):
    with pytest.raises(ValueError, match="hidden layer cannot be a plain timm classifier; export it with --format onnx"):
        save_pretrained(_tuner(hidden_dim=16), tmp_path / "m")


@pytest.mark.parametrize("change,message", [
    ({"architecture": "os.system"}, "is not a timm model name"),
    ({"model_args": {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}}, "are not allowed"),
    ({"model_args": {"pad_type": "same", "num_classes": 1000}}, "num_classes must equal"),
    ({"label_names": ["a"], "num_classes": 1}, "at least 2 strings"),
    ({"pretrained_cfg": {"input_size": [3, 100000, 64]}}, "input_size"),
])
def test_a_strangers_folder_is_checked_before_anything_is_built(tmp_path, change, message):
    save_pretrained(_tuner(), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(change)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_pretrained(tmp_path / "m")


def test_pickle_weights_are_never_read(tmp_path):
    save_pretrained(_tuner(), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors weights are read"):
        load_pretrained(tmp_path / "m")


def test_cli_export_format_timm_writes_the_folder(tmp_path, capsys):
    from tlkit.cli import main

    tiny_tuner(CLASSES).save(tmp_path / "m.safetensors")
    assert main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--format", "timm",
                 "--output", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "timm"
    assert timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).num_classes == 3


def test_the_folder_is_readable_tagged_as_fine_tuned_and_carries_a_model_card(tmp_path):
    """Issue 23: model.safetensors was written 0600, the TF file's fine-tune was tagged as timm's
    ``ra_in1k``, and no model card went to the hub."""
    import os
    import stat

    from conftest import MOBILENET_FILE

    from tlkit import BackboneConfig, create_backbone

    model = HeadReplacer(len(CLASSES)).apply(create_backbone(BackboneConfig(name="mobilenetv2_100",
                                                                            weights=MOBILENET_FILE)))
    tuner = FineTuner(model, CLASSES, config=TrainConfig(device="cpu", progress=False),
                      data_config={"input_size": [3, 64, 64]})
    mask = os.umask(0o022)
    try:
        save_pretrained(tuner, tmp_path / "model")
    finally:
        os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "model").iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644, "README.md": 0o644}
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())["pretrained_cfg"]
    assert cfg["tag"] == "tlkit_ft" and "ra_in1k" not in json.dumps(cfg) and "hf_hub_id" not in cfg
    assert cfg["notes"] == ["fine-tuned with tlkit from file:mobilenetv2_100_tf_qat_dequant.safetensors"]
    card = (tmp_path / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "cardboard, glass, metal" in card
    assert str(MOBILENET_FILE.parent) not in card  # the base file by name, not by this machine's path
    assert timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True).pretrained_cfg["tag"] == "tlkit_ft"


def test_push_to_hub_uploads_the_model_card(tmp_path, monkeypatch):
    import sys
    import types

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            pass

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploaded.update({p.name: p.read_bytes() for p in __import__("pathlib").Path(folder_path).iterdir()})
            return "https://huggingface.co/x/y/commit/1"

    fake = types.ModuleType("huggingface_hub")
    fake.HfApi = FakeApi
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    from tlkit.hub import push_to_hub

    push_to_hub(_tuner(), "x/y")
    assert set(uploaded) == {"config.json", "model.safetensors", "README.md"}
