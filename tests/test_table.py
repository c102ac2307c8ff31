"""Labels from a table (issue 26): CSV/TSV/DataFrame/list, single- and multi-label, bad rows named, CLI and Python."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE

from tlkit import DatasetConfig
from tlkit.datasets import load_datasets, load_split
from tlkit.table import LabelTableDataset, read_label_table

CLASSES = ["cardboard", "glass", "metal"]
BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd-multilabel" / "labels.csv"


def photos(tmp_path, per_class=6):
    """Real photos copied flat into tmp/images (no class folders): only a table says what they are."""
    (tmp_path / "images").mkdir()
    rows = []
    for c in CLASSES:
        for f in sorted((SAMPLE / c).iterdir())[:per_class]:
            shutil.copy(f, tmp_path / "images" / f.name)
            rows.append((f"images/{f.name}", c))
    return rows


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_a_csv_of_paths_and_labels_is_an_image_folder_dataset(tmp_path):
    rows = photos(tmp_path)
    table = write_csv(tmp_path / "labels.csv", ["filename", "label"], rows)
    ds = LabelTableDataset(table)
    assert ds.classes == CLASSES and not ds.multilabel and len(ds) == 18
    assert ds.samples[0] == (tmp_path / rows[0][0], 0)
    x, y = LabelTableDataset(table, transform=lambda im: im.size)[7]
    assert y == 1 and len(x) == 2
    # the same table as a TSV, a DataFrame and a list
    tsv = write_csv(tmp_path / "labels.tsv", ["path", "class"], rows, delimiter="\t")
    assert LabelTableDataset(tsv).samples == ds.samples
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(rows, columns=["image", "category"])
    assert LabelTableDataset(frame, root=tmp_path).samples == ds.samples
    assert LabelTableDataset(rows, root=tmp_path).samples == ds.samples


@pytest.mark.parametrize("change,reason", [
    (("images/missing.jpg", "glass"), "file not found"),
    (("", "glass"), "empty path"),
    (("images/{first}", ""), "empty label"),
])
def test_a_bad_row_is_reported_with_its_file_and_line_never_dropped_silently(tmp_path, change, reason):
    rows = photos(tmp_path)
    bad = (change[0].format(first=Path(rows[0][0]).name), change[1])
    table = write_csv(tmp_path / "labels.csv", ["path", "label"], [*rows[:3], bad, *rows[3:]])
    ds = LabelTableDataset(table)
    assert len(ds) == 18 and len(ds.bad_rows) == 1
    assert str(ds.bad_rows[0]).startswith(f"{table}:5: ") and reason in str(ds.bad_rows[0])  # line 5: header + 3 rows
    report = ds.scan()
    assert f"{table}:5: {reason}" in report.summary()
    with pytest.raises(ValueError, match=rf"(?s)1 bad row.*labels.csv:5: .*{reason}"):
        LabelTableDataset(table, bad_images="error")


def test_a_label_outside_the_given_classes_is_a_bad_row(tmp_path):
    rows = photos(tmp_path)
    table = write_csv(tmp_path / "labels.csv", ["path", "label"], [*rows, (rows[0][0], "plastic")])
    ds = LabelTableDataset(table, classes=CLASSES)
    assert len(ds) == 18 and "label 'plastic' is not one of the classes" in str(ds.bad_rows[0])


def test_a_split_column_is_honoured(tmp_path):
    rows = photos(tmp_path)
    split = ["val" if i % 3 == 0 else ("test" if i % 3 == 1 else "train") for i in range(len(rows))]
    table = write_csv(tmp_path / "labels.csv", ["path", "label", "split"], [(*r, s) for r, s in zip(rows, split)])
    train, val = load_datasets(DatasetConfig(labels=table))
    test = load_split(DatasetConfig(labels=table), "test")
    assert (len(train), len(val), len(test)) == (6, 6, 6)
    assert {p for p, _ in train.samples} | {p for p, _ in val.samples} | {p for p, _ in test.samples} == \
        {tmp_path / r[0] for r in rows}
    # without val rows: a stratified split of the train rows; test rows never train
    table2 = write_csv(tmp_path / "t2.csv", ["path", "label", "split"],
                       [(*r, "test" if s == "test" else "train") for r, s in zip(rows, split)])
    train2, val2 = load_datasets(DatasetConfig(labels=table2, val_fraction=0.5))
    assert len(train2) + len(val2) == 12 and not {p for p, _ in train2.samples + val2.samples} & \
        {p for p, _ in test.samples}


def test_the_multilabel_csv_of_bccd_reads_three_labels_from_its_0_1_columns():
    if not BCCD.is_file():
        pytest.skip("../shared/data/bccd-multilabel is not here")
    table = read_label_table(BCCD)
    assert table.multilabel and table.labels == ["Platelets", "RBC", "WBC"] and not table.bad
    ds = LabelTableDataset(table, split="train")
    assert len(ds) == 292 and ds.multilabel
    x, y = LabelTableDataset(table, split="test", transform=lambda im: 0)[0]
    assert y.dtype == torch.float32 and y.shape == (3,) and set(y.tolist()) <= {0.0, 1.0}
    assert ds.class_counts()["Platelets"] < ds.class_counts()["RBC"]


def test_labels_joined_by_a_separator_are_multilabel(tmp_path):
    rows = photos(tmp_path, per_class=2)
    table = write_csv(tmp_path / "labels.csv", ["path", "labels"],
                      [(p, f"{c}|shiny" if c != "cardboard" else c) for p, c in rows])
    ds = LabelTableDataset(table)
    assert ds.multilabel and ds.classes == ["cardboard", "glass", "metal", "shiny"]
    assert ds.samples[2][1] == (1, 3) and ds[2][1].tolist() == [0.0, 1.0, 0.0, 1.0]


def _cli_table(tmp_path, multilabel=False):
    rows = photos(tmp_path)
    if multilabel:
        header = ["filename", "split", "cardboard", "glass", "metal", "n_items"]
        body = [(p, "test" if i % 6 == 5 else "train", int(c == "cardboard"), int(c == "glass" or i % 4 == 0),
                 int(c == "metal"), 3) for i, (p, c) in enumerate(rows)]
    else:
        header, body = ["filename", "label", "split"], [(p, c, "test" if i % 6 == 5 else "train")
                                                       for i, (p, c) in enumerate(rows)]
    return write_csv(tmp_path / "labels.csv", header, body)


@pytest.mark.parametrize("multilabel", [False, True])
def test_cli_trains_evaluates_predicts_exports_and_serves_from_a_table(tmp_path, capsys, multilabel):
    from tlkit import FineTuner, RunConfig
    from tlkit.cli import main

    table = _cli_table(tmp_path, multilabel)
    run = tmp_path / "run"
    sets = [f"data.labels={table}", f"output_dir={run}", "backbone.name=test_resnet", "backbone.pretrained=false",
            "backbone.data_config.input_size=[3,64,64]", "train.batch_size=4", "train.device=cpu",
            "train.progress=false", "train.epochs=2", "train.warmup_epochs=0", "data.val_fraction=0.3"]
    assert main(["train", *[a for s in sets for a in ("--set", s)]]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    recorded = RunConfig.from_file(run / "config.yaml")
    assert recorded.head.multilabel is multilabel and recorded.data.labels == table
    assert ("map" in out) is multilabel and ("top1" in out) is not multilabel
    if out["checkpoint"] == "best.safetensors":  # named by the metric that picked it: mAP has no top-1
        assert out["selected_by"] == f"best {'map' if multilabel else 'top1'} on the validation split"
    assert main(["evaluate", "--checkpoint", str(run), "--split", "test"]) == 0
    captured = capsys.readouterr()
    test = json.loads(captured.out)
    assert f"reading {table} as recorded" in captured.err and "of the test split of" in captured.err
    assert (test.get("n") or 3) == 3
    photo = str(tmp_path / "images" / sorted((tmp_path / "images").iterdir())[0].name)
    assert main(["predict", "--checkpoint", str(run), photo]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert ("labels" in pred) is multilabel
    pytest.importorskip("onnx")
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "m.onnx")]) == 0
    loaded = FineTuner.load(run, progress=False)
    assert loaded.multilabel is multilabel and (loaded.thresholds is not None) is multilabel
