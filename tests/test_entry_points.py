"""Issue 23: every way into tlkit gives the model that was tested.

For each entry point (``tlkit train``, ``FineTuner.from_config``, the hand-built Python route,
the example, ``tlkit rank``, ``tlkit lr-find``) with the shipped MobileNetV2 file, a weights file
tlkit recognises: what the run records rebuilds a network whose logits equal the trained
in-memory network's (max abs diff <= 1e-5) on real photos read from disk, the file's own
preprocessing (``pad_type="same"``, mean = std = 0.5) is what trains and what is recorded, and
``tlkit evaluate --split val`` reproduces the run's printed metrics exactly.
"""

import importlib.util
import json

import pytest
import timm
import torch
from conftest import MOBILENET_FILE, REPO, copy_sample

from tlkit import BackboneConfig, FineTuner, HeadReplacer, ImageFolderDataset, RunConfig, TrainConfig, create_backbone
from tlkit.cli import main

CLASSES = ("cardboard", "glass", "metal")
SMALL = "backbone.data_config.input_size=[3,96,96]"  # a small view keeps each run to seconds
FAST = ["train.epochs=1", "train.warmup_epochs=0", "train.batch_size=4", "train.device=cpu", "train.progress=false",
        "data.val_fraction=0.34", SMALL]


@pytest.fixture
def data(tmp_path):
    return copy_sample(tmp_path / "data", CLASSES, per_class=6)


@pytest.fixture
def built(monkeypatch):
    """Every FineTuner an entry point builds with `FineTuner.from_config` (the in-memory model)."""
    tuners = []
    real = FineTuner.from_config.__func__

    def spy(cls, *args, **kwargs):
        tuners.append(real(cls, *args, **kwargs))
        return tuners[-1]

    monkeypatch.setattr(FineTuner, "from_config", classmethod(spy))
    return tuners


def photos(root):
    return sorted(str(p) for p in root.rglob("*.jpg"))


def logits(tuner: FineTuner, files) -> torch.Tensor:
    """Float32 logits of real photos read from disk through the tuner's own eval transform."""
    x = torch.stack([tuner.prepare_input(f) for f in files])
    model = tuner.model.eval()
    with torch.no_grad():
        return model(x.to(tuner.device)).float().cpu()


def rebuilt_from_config(config: RunConfig, classes, weights_from: FineTuner) -> FineTuner:
    """A network built from a recorded config alone, carrying the trained weights."""
    config = config.model_copy(update={"train": config.train.model_copy(update={"precision": "fp32"})})
    tuner = FineTuner.from_config(config, classes)
    tuner.model.load_state_dict(weights_from.model.state_dict())
    return tuner


def fp32(tuner: FineTuner) -> FineTuner:
    """The same network in float32 (autocast off), so that logits compare to 1e-5."""
    tuner.runtime.amp_dtype = None
    return tuner


def assert_trains_the_file_as_tested(tuner: FineTuner) -> None:
    assert type(tuner.model.conv_stem).__name__ == "Conv2dSame"  # TensorFlow's "same" padding
    assert tuner.data_config["mean"] == [0.5] * 3 and tuner.data_config["std"] == [0.5] * 3
    assert tuner.backbone.model_kwargs == {"pad_type": "same"}


def assert_rebuilds(trained: FineTuner, run, data, config: RunConfig | None = None) -> None:
    """The checkpoint and the recorded config both rebuild the trained network, logits within 1e-5."""
    files = photos(data)
    want = logits(fp32(trained), files)
    loaded = FineTuner.load(run, device="cpu", precision="fp32", progress=False)
    assert_trains_the_file_as_tested(loaded)
    assert (logits(loaded, files) - want).abs().max() <= 1e-5
    if config is not None:
        again = rebuilt_from_config(config, trained.classes, trained)
        assert_trains_the_file_as_tested(again)
        assert (logits(again, files) - want).abs().max() <= 1e-5


def evaluate_split(run, capsys) -> dict:
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--split", "val", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_train_records_and_saves_the_network_it_trained(data, tmp_path, built, capsys):
    run = tmp_path / "run"
    args = ["train", "--recipe", "linear-probe", "--set", f"data.root={data}", "--set", f"output_dir={run}",
            "--set", f"backbone.weights={MOBILENET_FILE}", *[a for s in FAST for a in ("--set", s)]]
    assert main(args) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out.splitlines()[-1])
    assert f"weights file {MOBILENET_FILE}" in err  # says which file it used
    (trained,) = built
    assert_trains_the_file_as_tested(trained)
    recorded = RunConfig.from_file(run / "config.yaml")
    assert recorded.backbone.model_kwargs == {"pad_type": "same"} and recorded.backbone.data_config.mean == (0.5,) * 3
    assert_rebuilds(trained, run, data, recorded)
    again = evaluate_split(run, capsys)
    assert {k: again[k] for k in ("n", "top1", "macro_f1", "per_class_recall", "confusion_matrix")} == \
        {k: printed[k] for k in ("n", "top1", "macro_f1", "per_class_recall", "confusion_matrix")}


def test_from_config_records_the_resolved_backbone(data, tmp_path):
    from tlkit import load_datasets

    config = RunConfig(backbone=BackboneConfig(name="mobilenetv2_100", weights=MOBILENET_FILE),
                       data={"root": data, "val_fraction": 0.34}, output_dir=tmp_path / "run")
    config = config.with_overrides(FAST)
    train, val = load_datasets(config.data)
    tuner = FineTuner.from_config(config, train.classes)
    assert_trains_the_file_as_tested(tuner)
    tuner.fit(train, val)
    assert_rebuilds(tuner, tmp_path / "run", data, config)


def test_the_hand_built_python_route_saves_what_it_trained(data, tmp_path):
    from tlkit import stratified_split

    train, val = stratified_split(ImageFolderDataset(data), val_fraction=0.34, seed=0)
    model = create_backbone(BackboneConfig(name="mobilenetv2_100", weights=MOBILENET_FILE))
    model = HeadReplacer(num_classes=len(train.classes)).apply(model)
    tuner = FineTuner(model, train.classes, config=TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, device="cpu",
                                                               progress=False),
                      data_config={"input_size": [3, 96, 96]}, output_dir=tmp_path / "run")
    assert_trains_the_file_as_tested(tuner)
    tuner.fit(train, val)
    assert_rebuilds(tuner, tmp_path / "run", data)


def _example():
    spec = importlib.util.spec_from_file_location("garbage_train", REPO / "examples" / "garbage" / "train.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_the_example_and_tlkit_train_record_the_same_run(data, tmp_path, built, capsys):
    run = tmp_path / "example"
    summary = _example().main(["--data", str(data), "--recipe", "linear-probe", "--output", str(run),
                               "--val-fraction", "0.34", "--no-progress", "--epochs", "1",
                               *[a for s in FAST[1:] for a in ("--set", s)]])
    trained = built[0]
    assert_trains_the_file_as_tested(trained)
    recorded = RunConfig.from_file(run / "config.yaml")
    assert_rebuilds(trained, run, data, recorded)
    again = evaluate_split(run, capsys)
    assert round(again["top1"], 4) == summary["top1"] and round(again["macro_f1"], 4) == summary["macro_f1"]
    # tlkit train with the same data, weights and recipe records the same data config and train settings.
    cli = tmp_path / "cli"
    assert main(["train", "--recipe", "linear-probe", "--set", f"data.root={data}", "--set", f"output_dir={cli}",
                 "--set", f"backbone.weights={MOBILENET_FILE}", "--set", "train.progress=false",
                 *[a for s in FAST for a in ("--set", s)]]) == 0
    other = RunConfig.from_file(cli / "config.yaml")
    assert other.backbone == recorded.backbone and other.freeze == recorded.freeze
    assert other.train == recorded.train and other.data.augment == recorded.data.augment


def test_the_linear_probe_recipe_carries_its_view_and_worker():
    """The documented probe (whole frame at 448 x 336, one decode worker) is the library's recipe."""
    from tlkit import apply_recipe

    config = apply_recipe(RunConfig(), "linear-probe")
    view = config.backbone.data_config
    assert (view.input_size, view.crop_pct, view.crop_mode) == ((3, 448, 336), 1.0, "squash")
    assert config.train.num_workers == 1 and config.train.feature_cache
    example = _example()
    args = example.parse_args(["--recipe", "linear-probe"])
    shipped = example.build_config(args)
    assert shipped.backbone.data_config == view and shipped.train.num_workers == 1


def test_rank_scores_the_file_with_its_own_preprocessing(data, capsys):
    from tlkit.transferability import logme

    assert main(["rank", "--data", str(data), "--backbone", f"mobilenetv2_100={MOBILENET_FILE}", "--format", "json",
                 "--workers", "0", "--device", "cpu"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    # The same features computed by hand from the network a run trains: resolved file, its transform.
    tuner = FineTuner(create_backbone(BackboneConfig(name="mobilenetv2_100", weights=MOBILENET_FILE)),
                      [str(i) for i in range(1000)], config=TrainConfig(device="cpu", progress=False))
    assert_trains_the_file_as_tested(tuner)
    ds = ImageFolderDataset(data)
    x = torch.stack([tuner.prepare_input(p) for p, _ in ds.samples])
    with torch.no_grad(), tuner.runtime.autocast():
        feats = tuner.model.forward_head(tuner.model.forward_features(x.contiguous(memory_format=torch.channels_last)),
                                         pre_logits=True).float()
    assert ranked["logme"] == pytest.approx(logme(feats, torch.tensor([y for _, y in ds.samples])), abs=1e-3)


def test_lr_find_sweeps_the_network_a_run_trains(data, tmp_path, built, capsys):
    assert main(["lr-find", "--set", f"data.root={data}", "--set", f"backbone.weights={MOBILENET_FILE}",
                 "--set", SMALL, "--set", "train.device=cpu", "--set", "train.batch_size=4", "--set",
                 "train.progress=false", "--steps", "5", "--start-lr", "1e-4", "--end-lr", "1e-1"]) == 0
    (tuner,) = built
    assert_trains_the_file_as_tested(tuner)
    assert json.loads(capsys.readouterr().out)["steps"] == 5


def test_resolving_twice_changes_nothing_and_a_tag_keeps_its_hub_weights():
    from tlkit import resolve_backbone

    once = resolve_backbone(BackboneConfig(name="mobilenetv2_100", weights=MOBILENET_FILE))
    assert resolve_backbone(once) == once
    assert once.model_kwargs == {"pad_type": "same"} and once.data_config.mean == (0.5,) * 3
    assert once.data_config.input_size is None  # the view stays the caller's
    # a name without a file: the shipped file of this checkout is found by its content
    default = resolve_backbone(BackboneConfig())
    assert default.weights == MOBILENET_FILE.resolve() and default.model_kwargs == {"pad_type": "same"}
    assert resolve_backbone(BackboneConfig(pretrained=False)).weights is None
    assert timm.is_model("mobilenetv2_100.ra_in1k")
