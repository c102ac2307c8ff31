"""Top losses and most-confused pairs (issue 26), checked against a hand computation."""

import math

from conftest import copy_sample, tiny_tuner
from PIL import Image

from tlkit import ImageFolderDataset
from tlkit.interpret import most_confused, plot_top_losses, top_losses

CLASSES = ["cardboard", "glass", "metal"]


def test_most_confused_lists_off_diagonal_cells_most_frequent_first():
    matrix = [[5, 2, 0], [3, 4, 3], [1, 0, 6]]
    assert most_confused(matrix, CLASSES) == [("glass", "cardboard", 3), ("glass", "metal", 3),
                                              ("cardboard", "glass", 2), ("metal", "cardboard", 1)]
    assert most_confused(matrix, CLASSES, min_count=3) == [("glass", "cardboard", 3), ("glass", "metal", 3)]


def test_top_losses_are_the_photos_with_the_lowest_probability_of_their_class(tmp_path):
    data = ImageFolderDataset(copy_sample(tmp_path / "data", CLASSES, 3))
    tuner = tiny_tuner(CLASSES)
    worst = top_losses(tuner, data, k=4)
    preds = {p.path: p for p in tuner.predict([str(p) for p, _ in data.samples])}
    expected = sorted(((-math.log(preds[str(p)].probabilities[CLASSES[y]]), str(p)) for p, y in data.samples), reverse=True)
    assert [t.path for t in worst] == [p for _, p in expected[:4]]
    assert [round(t.loss, 6) for t in worst] == [round(v, 6) for v, _ in expected[:4]]
    png = plot_top_losses(worst, tmp_path / "top.png")
    assert Image.open(png).format == "PNG"


def test_fit_writes_top_losses_into_the_run_folder(tmp_path):
    train = ImageFolderDataset(copy_sample(tmp_path / "train", CLASSES, 3))
    val = ImageFolderDataset(copy_sample(tmp_path / "val", CLASSES, 2, offset=10))
    tiny_tuner(CLASSES, output_dir=tmp_path / "run", epochs=1).fit(train, val)
    assert Image.open(tmp_path / "run" / "top_losses.png").width > 100
    import json

    matrix = json.loads((tmp_path / "run" / "report.json").read_text())["confusion_matrix"]
    off = any(matrix[i][j] for i in range(3) for j in range(3) if i != j)
    assert ("Most confused" in (tmp_path / "run" / "report.md").read_text()) == off
