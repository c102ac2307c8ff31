"""Run artefacts written by fit: plots, per-class report, model card."""

import json

import numpy as np
import pytest
import torch
from conftest import copy_sample, tiny_tuner
from PIL import Image

from tlkit import ClassificationMetrics, ImageFolderDataset
from tlkit.report import class_report, plot_confusion_matrix

CLASSES = ["cardboard", "glass", "metal"]


def test_per_class_precision_recall_f1_match_sklearn():
    from sklearn.metrics import precision_recall_fscore_support

    y = [0, 0, 0, 1, 1, 2, 2, 2, 2, 1]
    p = [0, 1, 0, 1, 2, 2, 2, 0, 2, 1]
    m = ClassificationMetrics.from_predictions(y, p, CLASSES)
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=[0, 1, 2], zero_division=0)
    r = class_report(m)
    assert [r["classes"][c]["precision"] for c in CLASSES] == pytest.approx(prec.tolist())
    assert [r["classes"][c]["recall"] for c in CLASSES] == pytest.approx(rec.tolist())
    assert [r["classes"][c]["f1"] for c in CLASSES] == pytest.approx(f1.tolist())
    assert [r["classes"][c]["support"] for c in CLASSES] == sup.tolist()


def test_fit_writes_plots_report_and_model_card(tmp_path):
    train = ImageFolderDataset(copy_sample(tmp_path / "train", CLASSES, 4))
    val = ImageFolderDataset(copy_sample(tmp_path / "val", CLASSES, 2, offset=10))
    tuner = tiny_tuner(CLASSES, output_dir=tmp_path / "run", epochs=2)
    tuner.fit(train, val)
    run = tmp_path / "run"
    for name in ("confusion_matrix.png", "curves.png"):
        with Image.open(run / name) as im:
            assert im.format == "PNG" and im.width > 300
    report = json.loads((run / "report.json").read_text())
    best = next(r for r in tuner.history if r["epoch"] == tuner.best["epoch"])
    assert report["epoch"] == best["epoch"] and report["confusion_matrix"] == best["confusion_matrix"]
    assert report["top1"] == pytest.approx(best["top1"])
    assert sum(v["support"] for v in report["classes"].values()) == 6
    md = (run / "report.md").read_text()
    assert all(f"| {c} |" in md for c in CLASSES)
    card = (run / "MODEL_CARD.md").read_text()
    assert "test_resnet" in card and "12 training and 6 validation images" in card
    assert "## Limitations" in card and f"Images: {train.root.name};" in card and str(tmp_path) not in card


def test_confusion_matrix_plot_is_row_normalised(tmp_path):
    m = ClassificationMetrics(CLASSES, torch.tensor([[8, 2, 0], [0, 5, 5], [0, 0, 1]]))
    path = plot_confusion_matrix(m, tmp_path / "cm.png")
    pixels = np.asarray(Image.open(path).convert("L"))
    assert pixels.std() > 10  # not blank
