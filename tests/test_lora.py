"""LoRA adapters through FreezePolicy: what trains, resume, checkpoints and merged exports (tiny ViT/DeiT)."""

import json

import pytest
import torch
from pydantic import ValidationError

pytest.importorskip("peft")
import timm  # noqa: E402
from conftest import SMALL, Crash, CrashAfter, copy_sample  # noqa: E402

from tlkit import BackboneConfig, FineTuner, FreezePolicy, HeadReplacer, ImageFolderDataset, TrainConfig  # noqa: E402
from tlkit.lora import LoraSettings, has_lora, lora_param_names, merged_copy  # noqa: E402

CLASSES = ["cardboard", "glass", "metal"]
TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _tuner(output_dir=None, policy=None, name="test_vit", epochs=2, callbacks=None):
    kwargs = {"img_size": 64}
    torch.manual_seed(0)
    model = HeadReplacer(len(CLASSES)).apply(timm.create_model(name, **kwargs))
    cfg = TrainConfig(epochs=epochs, batch_size=4, eval_batch_size=8, lr=1e-2, warmup_epochs=0, precision="fp32",
                      device="cpu", progress=False)
    return FineTuner(model, CLASSES, policy=policy or FreezePolicy.lora_finetune(rank=4), config=cfg,
                     data_config=dict(SMALL), output_dir=output_dir, callbacks=callbacks,
                     backbone=BackboneConfig(name=name, pretrained=False, model_kwargs=kwargs))


@pytest.fixture
def data(tmp_path):
    return (ImageFolderDataset(copy_sample(tmp_path / "train", CLASSES, 4)),
            ImageFolderDataset(copy_sample(tmp_path / "val", CLASSES, 2, offset=10)))


@pytest.mark.parametrize("name", ["test_vit", "deit_tiny_patch16_224"])
def test_lora_trains_exactly_the_adapters_and_the_head(name):
    plain = timm.create_model(name, img_size=64)
    targeted = {n: m for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS)}
    tuner = _tuner(name=name)
    trainable = tuner.policy.apply(tuner.model)
    head = {f"{h}.{k}" for h in ("head", "head_dist") if hasattr(plain, h) for k in ("weight", "bias")}
    expected = {f"{n}.lora_{ab}.default.weight" for n in targeted for ab in "AB"} | head
    assert trainable == expected
    assert sum(p.numel() for n, p in tuner.model.named_parameters() if n in lora_param_names(tuner.model)) == \
        sum(4 * (m.in_features + m.out_features) for m in targeted.values())
    assert not tuner.model.get_submodule("blocks.0.attn.qkv.base_layer").weight.requires_grad


def test_lora_targets_that_match_nothing_say_so():
    with pytest.raises(ValueError, match=r"targets \['nope'\] match no nn.Linear"):
        _tuner(policy=FreezePolicy(depth=-1, lora=LoraSettings(targets=["nope"])))
    with pytest.raises(ValidationError, match="dotted module names"):
        LoraSettings(targets=["attn.qkv; import os"])


def test_a_policy_without_lora_refuses_a_model_with_adapters():
    tuner = _tuner()
    with pytest.raises(ValueError, match="FreezePolicy.lora is not set"):
        FreezePolicy.linear_probe().trainable_names(tuner.model)
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        FreezePolicy.lora_finetune().trainable_names(timm.create_model("test_vit", img_size=64))


def test_lora_resume_is_bit_identical(data, tmp_path):
    train, val = data
    full = _tuner(tmp_path / "full", epochs=3)
    full.fit(train, val)
    crashing = _tuner(tmp_path / "part", epochs=3, callbacks=[CrashAfter(1)])
    with pytest.raises(Crash):
        crashing.fit(train, val)
    resumed = _tuner(tmp_path / "part", epochs=3)
    resumed.fit(train, val, resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]


def test_lora_checkpoint_loads_back_and_every_export_is_merged(data, tmp_path):
    train, val = data
    tuner = _tuner(tmp_path / "run")
    tuner.fit(train, val)
    assert any(p.abs().sum() > 0 for n, p in tuner.model.named_parameters() if ".lora_B." in n)  # it learned
    loaded = FineTuner.load(tmp_path / "run" / "last.safetensors", progress=False)
    x = torch.randn(3, 3, 64, 64)
    tuner.model.eval()
    with torch.no_grad():
        expected = tuner.model(x)
        torch.testing.assert_close(loaded.model(x), expected, rtol=0, atol=0)
        merged = merged_copy(tuner.model)
        assert not has_lora(merged) and has_lora(tuner.model)
        assert set(merged.state_dict()) == set(timm.create_model("test_vit", img_size=64, num_classes=3).state_dict())
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
    from tlkit.export import check_torch_export, export_torch

    assert check_torch_export(export_torch(tuner.model, tmp_path / "m.pt2", (3, 64, 64)), tuner.model, x) <= 1e-4
    folder = tuner.save_pretrained(tmp_path / "timm")
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-4)
    assert "lora" not in json.dumps(sorted(plain.state_dict()))


def test_lora_onnx_export_needs_no_peft_and_matches(data, tmp_path):
    pytest.importorskip("onnxruntime")
    from tlkit.export import check_onnx, export_onnx

    tuner = _tuner()
    for n, p in tuner.model.named_parameters():  # a non-zero update, as after training
        if ".lora_B." in n:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    path = export_onnx(tuner.model, tmp_path / "m.onnx", (3, 64, 64))
    import onnx

    assert not [i.name for i in onnx.load(str(path)).graph.initializer if "lora" in i.name]
    assert check_onnx(path, tuner.model, torch.randn(2, 3, 64, 64)) <= 1e-4


def test_lora_settings_come_from_a_run_config():
    from tlkit import RunConfig

    cfg = RunConfig.model_validate({"backbone": {"name": "test_vit", "pretrained": False},
                                    "data": {"root": "x"}, "freeze": {"depth": -1, "lora": {"rank": 4}}})
    assert cfg.freeze.lora == LoraSettings(rank=4) and cfg.freeze.lora.targets == list(TARGETS)
