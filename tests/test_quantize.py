"""INT8 ONNX: static quantisation that keeps same-padding and both kinds of BatchNorm, and its check."""

import json

import pytest
import torch
from conftest import copy_sample, recorded_run, tiny_tuner

from tlkit import HeadReplacer, ImageFolderDataset, load_image
from tlkit.cli import main

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from tlkit import quantize  # noqa: E402
from tlkit.quantize import compare_onnx, export_onnx_int8, onnx_logits, read_metadata  # noqa: E402

CLASSES = ["cardboard", "glass", "metal"]
SIZE = (3, 96, 96)


def _photos(tmp_path, per_class=6, size=SIZE):
    from tlkit.data import create_transforms

    _, transform = create_transforms({"input_size": size, "interpolation": "bilinear", "crop_pct": 1.0,
                                      "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_mode": "center"})
    ds = ImageFolderDataset(copy_sample(tmp_path / "img", CLASSES, per_class))
    return torch.stack([transform(load_image(p)) for p, _ in ds.samples]), [y for _, y in ds.samples]


def _net(batchnorm: str, x: torch.Tensor, pad_type: str = "same"):
    """timm's tiny random-init EfficientNet with TF "same" padding and real or folded BatchNorm.

    Real: running statistics measured on ``x`` (as after training). Folded, as in the shipped TF
    MobileNetV2 weights: weight 1, mean 0, var 1 - eps, the conv bias in BN's bias.
    """
    import timm

    torch.manual_seed(0)
    model = HeadReplacer(3).apply(timm.create_model("test_efficientnet", pad_type=pad_type))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            if batchnorm == "real":
                m.momentum = None  # a cumulative average over the batch below
                m.reset_running_stats(), m.weight.data.uniform_(0.5, 1.5)
            else:
                m.running_mean.zero_(), m.running_var.fill_(1 - m.eps), m.weight.data.fill_(1.0)
            m.bias.data.normal_(0, 0.5)
    if batchnorm == "real":
        with torch.no_grad():
            model.train()(x)
    return model.eval()


@pytest.mark.parametrize("batchnorm", ["real", "folded"])
def test_int8_keeps_same_padding_and_batchnorm(tmp_path, batchnorm):
    x, _ = _photos(tmp_path)
    model = _net(batchnorm, x)
    path = export_onnx_int8(model, tmp_path / "m.onnx", SIZE, x, metadata={"classes": CLASSES})
    with torch.no_grad():
        expected = model(x)
        symmetric = _net(batchnorm, x, pad_type="")
        symmetric.load_state_dict(model.state_dict())
        other = symmetric(x)  # the same weights with timm's symmetric padding: what a lost "same" would give
    got = onnx_logits(path, x)
    error = (got - expected).abs().mean()
    assert error < 0.25 * (other - expected).abs().mean()  # measured: 0.10 (real), 0.05 (folded)
    assert error < 0.2 * expected.std()
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert read_metadata(path) == {"classes": CLASSES}
    assert not list(tmp_path.glob(".tlkit-int8-*"))  # the work folder is gone


def test_int8_weights_are_int8_per_channel(tmp_path):
    x, _ = _photos(tmp_path, per_class=2)
    path = export_onnx_int8(_net("real", x), tmp_path / "m.onnx", SIZE, x)
    graph = onnx.load(str(path)).graph
    init = {t.name: t for t in graph.initializer}
    conv_weights = [n.input[1] for n in graph.node if n.op_type == "Conv"]
    # In QDQ form each conv's weight is the output of a DequantizeLinear of an int8 tensor with
    # one scale per output channel.
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    checked = 0
    for w in conv_weights:
        node = dq[w]
        q, scale = init[node.input[0]], init[node.input[1]]
        assert q.data_type == onnx.TensorProto.INT8
        assert scale.dims and scale.dims[0] == q.dims[0] > 1
        checked += 1
    assert checked == len(conv_weights) >= 5


def test_int8_refuses_calibration_of_the_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match=r"calibration must be \(N, 3, 96, 96\)"):
        export_onnx_int8(_net("folded", None), tmp_path / "m.onnx", SIZE, torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="method='best'"):
        export_onnx_int8(_net("folded", None), tmp_path / "m.onnx", SIZE, torch.zeros(2, *SIZE), method="best")
    assert not (tmp_path / "m.onnx").exists()


def test_compare_counts_agreement_and_top1_from_the_labels(tmp_path):
    from tlkit.export import export_onnx

    x, labels = _photos(tmp_path, per_class=2)
    model = _net("real", x)
    fp32 = export_onnx(model, tmp_path / "a.onnx", SIZE)
    out = compare_onnx(fp32, fp32, x, labels, seconds=0.2)
    with torch.no_grad():
        top1 = float((model(x).argmax(1) == torch.tensor(labels)).float().mean())
    assert out["checked_images"] == 6 and out["top1_agreement"] == 1.0 and out["top1_change"] == 0.0
    assert out["fp32_top1"] == pytest.approx(top1) and out["size_ratio"] == 1.0
    assert out["fp32_images_per_s"] > 0 and out["int8_images_per_s"] > 0


def test_cli_calibrates_on_the_run_training_split_and_reports_the_check(tmp_path, capsys):
    root = copy_sample(tmp_path / "data", CLASSES, 4)
    checkpoint = recorded_run(tmp_path / "run", root, CLASSES, val_fraction=0.25)
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "q.onnx"),
                 "--format", "onnx-int8", "--check", str(root), "--check-limit", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibration"].startswith("training split of") and out["calibration_images"] == 9
    assert out["checked_images"] == 12 and 0 <= out["top1_agreement"] <= 1
    assert out["top1_change"] == pytest.approx(out["int8_top1"] - out["fp32_top1"])
    assert read_metadata(tmp_path / "q.onnx")["classes"] == CLASSES


def test_cli_without_calibration_photos_says_what_to_pass_and_writes_nothing(tmp_path, capsys):
    tuner = tiny_tuner(CLASSES)
    tuner.save(tmp_path / "m.safetensors")
    assert main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--output", str(tmp_path / "q.onnx"),
                 "--format", "onnx-int8"]) == 2
    err = capsys.readouterr().err
    assert "needs --calibration FOLDER" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()


def test_cli_default_calibration_count_is_the_library_one():
    from tlkit.cli._args import CALIBRATION_IMAGES

    assert CALIBRATION_IMAGES == quantize.CALIBRATION_IMAGES


@pytest.mark.parametrize("flags,said", [({"avx2", "fma"}, True), ({"avx2", "avx512_vnni"}, False),
                                        ({"avx2", "avx_vnni"}, False), ({"amx_int8"}, False)])
def test_export_says_in_one_line_when_the_cpu_cannot_run_int8_faster(tmp_path, capsys, monkeypatch, flags, said):
    """Issue 23: on an AVX2-only EPYC INT8 gave no speed-up and the tool said nothing."""
    import tlkit._cpu as cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    root = copy_sample(tmp_path / "data", CLASSES, 2)
    checkpoint = recorded_run(tmp_path / "run", root, CLASSES, val_fraction=0.5)
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "q.onnx"),
                 "--format", "onnx-int8"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tlkit export: note:")]
    assert len(notes) == int(said)
    if said:
        assert "avx512_vnni, avx_vnni, amx_int8" in notes[0] and "gains size" in notes[0]


def test_the_cpu_note_says_nothing_where_the_features_are_unknown(monkeypatch):
    import tlkit._cpu as cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset())
    assert cpu.int8_note() is None
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"fp", "asimd"}))
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    assert "asimddp, i8mm" in cpu.int8_note()
