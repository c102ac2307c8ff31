"""Real pretrained MobileNetV2 (offline file) on real shipped TrashNet photos."""

import pytest
import torch
from conftest import MOBILENET_FILE, SAMPLE

from tlkit import (
    BackboneConfig,
    DataConfigOverrides,
    FineTuner,
    FreezePolicy,
    HeadReplacer,
    ImageFolderDataset,
    TrainConfig,
    create_backbone,
)

pytestmark = pytest.mark.integration


def test_linear_probe_on_ten_photos_per_class_beats_chance_by_far(tmp_path):
    full = ImageFolderDataset(SAMPLE)
    per_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(full.samples):
        per_class.setdefault(label, []).append(i)
    train = full.subset([i for idx in per_class.values() for i in idx[:10]])
    test = full.subset([i for idx in per_class.values() for i in idx[10:20]])

    torch.manual_seed(0)
    backbone = BackboneConfig(
        name="mobilenetv2_100", weights=MOBILENET_FILE, model_kwargs={"pad_type": "same"},
        data_config=DataConfigOverrides(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.875,
                                        interpolation="bicubic"),
    )
    model = HeadReplacer(num_classes=6).apply(create_backbone(backbone))
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}
    tuner = FineTuner(model, full.classes, policy=FreezePolicy.linear_probe(),
                      config=TrainConfig(epochs=8, batch_size=20, lr=3e-3, warmup_epochs=0, progress=False),
                      output_dir=tmp_path / "run")
    tuner.fit(train)
    metrics = FineTuner.load(tmp_path / "run", progress=False).evaluate(test)
    assert metrics.n == 60
    assert metrics.top1 >= 0.6, metrics.to_dict()  # chance is 1/6
    # The frozen backbone, BatchNorm statistics included, did not move.
    after = tuner.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_flagship_example_runs_end_to_end(tmp_path, capsys):
    import importlib.util
    import json

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("garbage_train", REPO / "examples" / "garbage" / "train.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(["--epochs", "3", "--output", str(tmp_path / "run"), "--no-progress"])
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[-2]) == summary
    assert summary["val_images"] == 36 and summary["top1"] > 1 / 6
    assert "prediction for" in out.splitlines()[-1]
    # The run folder is what `python -m tlkit evaluate --checkpoint DIR` reads.
    from tlkit.cli import main as cli_main

    assert cli_main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--data", str(SAMPLE)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 180 and metrics["classes"] == sorted(metrics["per_class_recall"])
