"""ONNX and TorchScript export, checked against PyTorch on real photos."""

import json

import pytest
import torch
from conftest import copy_sample, tiny_tuner

from tlkit import ImageFolderDataset, load_image
from tlkit.cli import main
from tlkit.export import check_onnx, export_onnx, export_torchscript

CLASSES = ["cardboard", "glass", "metal"]


def photos(tuner, tmp_path, n=2):
    ds = ImageFolderDataset(copy_sample(tmp_path / "img", CLASSES, n))
    return torch.stack([tuner.eval_transform(load_image(p)) for p, _ in ds.samples])


def test_onnx_export_has_a_dynamic_batch_and_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    tuner = tiny_tuner(CLASSES)
    path = export_onnx(tuner.model, tmp_path / "m.onnx", (3, 64, 64), metadata={"classes": CLASSES})
    x = photos(tuner, tmp_path, 2)  # 6 images, a batch size the export never saw
    assert check_onnx(path, tuner.model, x) <= 1e-4
    assert check_onnx(path, tuner.model, x[:1]) <= 1e-4
    import onnx

    props = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert props["classes"] == CLASSES


def test_onnx_of_same_padded_mobilenet_matches(tmp_path):
    pytest.importorskip("onnxruntime")
    import timm

    from tlkit import HeadReplacer

    model = HeadReplacer(3).apply(timm.create_model("mobilenetv2_050", pad_type="same"))
    path = export_onnx(model, tmp_path / "m.onnx", (3, 96, 96))
    x = torch.randn(3, 3, 96, 96)
    assert check_onnx(path, model, x) <= 1e-4


def test_torchscript_export_runs_without_tlkit_and_keeps_metadata(tmp_path):
    tuner = tiny_tuner(CLASSES)
    path = export_torchscript(tuner.model, tmp_path / "m.pt", (3, 64, 64), metadata={"classes": CLASSES})
    extra = {"tlkit.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["tlkit.json"])["classes"] == CLASSES
    x = photos(tuner, tmp_path, 1)
    tuner.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tuner.model(x), atol=1e-5, rtol=1e-5)


def test_cli_export_checks_onnx_on_a_folder(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    tuner = tiny_tuner(CLASSES)
    tuner.save(tmp_path / "m.safetensors")
    root = copy_sample(tmp_path / "data", CLASSES, 2)
    assert main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--output", str(tmp_path / "m.onnx"),
                 "--check", str(root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checked_images"] == 6 and out["max_abs_logit_diff"] <= 1e-4
    assert main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--output", str(tmp_path / "m.pt"),
                 "--format", "torchscript"]) == 0
    assert (tmp_path / "m.pt").stat().st_size > 1000


def test_export_creates_missing_parent_folders(tmp_path):
    pytest.importorskip("onnx")
    tuner = tiny_tuner(CLASSES)
    onnx_path = export_onnx(tuner.model, tmp_path / "new" / "deeper" / "m.onnx", (3, 64, 64))
    assert onnx_path.is_file() and not list(onnx_path.parent.glob(".*.tmp"))
    ts_path = export_torchscript(tuner.model, tmp_path / "other" / "m.pt", (3, 64, 64))
    assert ts_path.is_file()


def test_torch_export_of_same_padded_mobilenet_has_a_dynamic_batch_and_matches(tmp_path):
    import timm

    from tlkit import HeadReplacer
    from tlkit.export import check_torch_export, export_torch

    model = HeadReplacer(3).apply(timm.create_model("mobilenetv2_050", pad_type="same"))
    with torch.no_grad():  # BatchNorm statistics that are not the identity: they must survive export
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = export_torch(model, tmp_path / "m.pt2", (3, 96, 96), metadata={"classes": CLASSES})
    extra = {"tlkit.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    assert json.loads(extra["tlkit.json"])["classes"] == CLASSES
    for batch in (1, 5):  # not the traced batch of 2
        x = torch.randn(batch, 3, 96, 96)
        assert program.module()(x).shape == (batch, 3)
        assert check_torch_export(path, model, x) <= 1e-4


def test_torchscript_export_leaks_no_deprecation_warnings(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_torchscript(tiny_tuner(CLASSES).model, tmp_path / "m.pt", (3, 64, 64))
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]


def test_cli_export_reads_the_check_photos_before_writing_and_accepts_plain_folders(tmp_path, capsys):
    tiny_tuner(CLASSES).save(tmp_path / "m.safetensors")
    args = ["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--format", "torch-export",
            "--output", str(tmp_path / "m.pt2")]
    (tmp_path / "empty").mkdir()
    assert main([*args, "--check", str(tmp_path / "empty")]) == 2
    assert "folder holds no image" in capsys.readouterr().err and not (tmp_path / "m.pt2").exists()
    plain = tmp_path / "plain"  # photos without class sub-folders
    plain.mkdir()
    for p in list(copy_sample(tmp_path / "data", CLASSES, 1).rglob("*.jpg")):
        p.rename(plain / p.name)
    assert main([*args, "--check", str(plain)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "torch-export" and out["checked_images"] == 3 and out["max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize("fmt,name", [("timm", "folder"), ("torchscript", "m.pt"), ("torch-export", "m.pt2")])
def test_cli_check_compares_every_format_with_pytorch(tmp_path, capsys, fmt, name):
    tuner = tiny_tuner(CLASSES)
    tuner.save(tmp_path / "m.safetensors")
    root = copy_sample(tmp_path / "data", CLASSES, 2)
    assert main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--output", str(tmp_path / name),
                 "--format", fmt, "--check", str(root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checked_images"] == 6 and out["max_abs_logit_diff"] <= 1e-4


def test_cli_check_of_a_missing_folder_names_the_option_and_writes_nothing(tmp_path, capsys):
    tuner = tiny_tuner(CLASSES)
    tuner.save(tmp_path / "m.safetensors")
    assert main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--output", str(tmp_path / "m.onnx"),
                 "--check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--check " + str(tmp_path / "nope") + ": no such folder, file or glob match")
    assert len(err.splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_onnx_export_shows_no_torch_exporter_warnings(tmp_path):
    pytest.importorskip("onnx")
    import warnings

    import timm

    from tlkit import HeadReplacer

    model = HeadReplacer(3).apply(timm.create_model("mobilenetv2_050", pad_type="same"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        export_onnx(model, tmp_path / "m.onnx", (3, 96, 96))
    assert not [str(w.message)[:80] for w in seen]
