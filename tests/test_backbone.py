import pytest
import timm
import torch
from conftest import MOBILENET_FILE
from safetensors.torch import save_file

from tlkit import BackboneConfig, create_backbone, resolve_data_config
from tlkit.backbone import load_weights, read_state_dict


@pytest.fixture
def source():
    torch.manual_seed(1)
    return timm.create_model("test_resnet")


def assert_same_weights(a, b):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_safetensors_file_by_name(source, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_backbone(BackboneConfig(name="test_resnet", weights=path))
    assert_same_weights(model, source)


def test_torch_file_wrapped_and_prefixed(source, tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    model = timm.create_model("test_resnet")
    load_weights(model, path)
    assert_same_weights(model, source)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": object()}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        read_state_dict(path)


def test_other_key_names_map_by_order(source, tmp_path):
    renamed = {f"_other{i}.w": v for i, (k, v) in enumerate(source.state_dict().items())
               if "num_batches_tracked" not in k}
    torch.save(renamed, tmp_path / "renamed.pt")
    model = timm.create_model("test_resnet")
    load_weights(model, tmp_path / "renamed.pt")  # auto: names differ -> by order
    assert_same_weights(model, source)
    # safetensors sorts its tensors by name: pairing by order would scramble them
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(ValueError, match="sorted by name"):
        load_weights(timm.create_model("test_resnet"), tmp_path / "renamed.safetensors")


def test_shape_mismatch_names_the_first_keys(source, tmp_path):
    path = tmp_path / "bad.safetensors"
    sd = {k: v.contiguous() for k, v in source.state_dict().items()}
    sd["layer1.0.conv1.weight"] = torch.zeros(1, 2, 3, 3)
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"bad.safetensors.*layer1\.0\.conv1\.weight \[1, 2, 3, 3\]"):
        load_weights(timm.create_model("test_resnet"), path, key_mapping="exact")
    torch.save({f"x{i}": v for i, (k, v) in enumerate(sd.items()) if "num_batches" not in k}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt.*x\d+ \[1, 2, 3, 3\] -> layer1\.0\.conv1\.weight"):
        load_weights(timm.create_model("test_resnet"), tmp_path / "bad.pt", key_mapping="by_order")


def test_file_for_another_architecture_is_rejected(source, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="w.safetensors"):
        load_weights(timm.create_model("test_efficientnet"), path)


def test_feature_only_file_keeps_the_classifier(source, tmp_path):
    path = tmp_path / "features.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("fc.")}, str(path))
    model = timm.create_model("test_resnet")
    fc = model.fc.weight.clone()
    load_weights(model, path)
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert torch.equal(model.fc.weight, fc)


def test_unknown_model_name_suggests_close_ones():
    with pytest.raises(ValueError, match="resnet18"):
        create_backbone(BackboneConfig(name="resnet_18"))


def test_hub_failure_explains_the_offline_route(monkeypatch):
    import tlkit.backbone as backbone
    import tlkit.pretrained as pretrained

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(pretrained, "hub_unreachable_reason", lambda timeout=3.0: "")
    monkeypatch.setattr(backbone, "hub_reachable", lambda: True)
    with pytest.raises(RuntimeError, match="weights=PATH"):
        create_backbone(BackboneConfig(name="resnet18", pretrained=True))


def test_kwargs_pass_through_to_timm():
    model = \
        create_backbone(BackboneConfig(name="mobilenetv2_050", pretrained=False, model_kwargs={"pad_type": "same"}))
    assert type(model.conv_stem).__name__ == "Conv2dSame"
    assert model.tlkit_backbone_config.model_kwargs == {"pad_type": "same"}


def test_data_config_from_weights_with_overrides():
    model = timm.create_model("mobilenetv2_100")
    default = resolve_data_config(model)
    assert default["mean"] == pytest.approx([0.485, 0.456, 0.406])  # timm's ImageNet default
    cfg = resolve_data_config(model, {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.875})
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.5, 0.5, 0.5]
    assert cfg["crop_pct"] == 0.875 and cfg["input_size"] == [3, 224, 224]
    assert cfg["interpolation"] == default["interpolation"]


def test_offline_mobilenet_file_loads_strictly():
    model = create_backbone(BackboneConfig(name="mobilenetv2_100", weights=MOBILENET_FILE,
                                           model_kwargs={"pad_type": "same"}))
    sd = read_state_dict(MOBILENET_FILE)
    assert len(sd) == 314
    assert torch.equal(model.classifier.weight, sd["classifier.weight"])
    assert model.classifier.out_features == 1000
