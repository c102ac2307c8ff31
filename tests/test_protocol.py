"""Stratified k-fold splits and the cross-validation / repeated-seed protocols."""

import statistics
from collections import Counter

import pytest
import yaml
from conftest import copy_sample

from tlkit import ImageFolderDataset, RunConfig, load_datasets
from tlkit.data import stratified_kfold
from tlkit.protocol import cross_validate, repeat_seeds

CLASSES = ["cardboard", "glass", "metal"]


def test_kfold_puts_every_image_in_exactly_one_stratified_validation_fold(tmp_path):
    root = copy_sample(tmp_path / "d", ("cardboard", "glass"), 7)
    copy_sample(root, ("metal",), 3)
    ds = ImageFolderDataset(root)
    seen = Counter()
    for fold in range(3):
        train, val = stratified_kfold(ds, 3, fold, seed=1)
        assert set(train.samples).isdisjoint(val.samples) and len(train) + len(val) == len(ds)
        counts = val.class_counts()
        assert counts["cardboard"] in (2, 3) and counts["metal"] == 1  # 7 -> 3/2/2, 3 -> 1/1/1
        seen.update(p for p, _ in val.samples)
    assert set(seen) == {p for p, _ in ds.samples} and set(seen.values()) == {1}
    assert stratified_kfold(ds, 3, 0, seed=1)[1].samples == stratified_kfold(ds, 3, 0, seed=1)[1].samples
    assert stratified_kfold(ds, 3, 0, seed=2)[1].samples != stratified_kfold(ds, 3, 0, seed=1)[1].samples
    with pytest.raises(ValueError, match="fold must be in"):
        stratified_kfold(ds, 3, 3)
    with pytest.raises(ValueError, match="fold 5 is out of range"):
        RunConfig.model_validate({"data": {"root": str(root), "num_folds": 5, "fold": 5}})


def tiny_config(tmp_path, root) -> RunConfig:
    return RunConfig.model_validate({
        "backbone": {"name": "test_resnet", "pretrained": False,
                     "data_config": {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3}},
        "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0, "precision": "fp32", "progress": False},
        "data": {"root": str(root)},
        "output_dir": str(tmp_path / "runs"),
    })


def test_cross_validate_runs_each_fold_and_summarises_the_final_models(tmp_path):
    root = copy_sample(tmp_path / "d", CLASSES, 5)
    lines = []
    result = cross_validate(tiny_config(tmp_path, root), 5, log=lines.append)
    assert [r["run"] for r in result.runs] == [0, 1, 2, 3, 4] and len(lines) == 5
    assert all(r["val_images"] == 3 and r["train_images"] == 12 for r in result.runs)
    top1 = [r["top1"] for r in result.runs]
    assert result.summary["top1"]["mean"] == pytest.approx(statistics.fmean(top1))
    assert result.summary["top1"]["std"] == pytest.approx(statistics.stdev(top1))
    assert set(result.summary) >= {"macro_f1", "train_seconds", "recall/glass"}
    saved = yaml.safe_load((tmp_path / "runs" / "fold-3" / "config.yaml").read_text())
    assert (saved["data"]["num_folds"], saved["data"]["fold"]) == (5, 3)
    _, val3 = load_datasets(RunConfig.model_validate(saved).data)
    assert len(val3) == 3
    assert "5-fold (5 runs)" in result.to_markdown()


def test_repeat_seeds_keeps_the_split_and_changes_the_training_seed(tmp_path):
    root = copy_sample(tmp_path / "d", CLASSES, 5)
    result = repeat_seeds(tiny_config(tmp_path, root), (0, 3), log=lambda s: None)
    assert [r["run"] for r in result.runs] == [0, 3]
    cfgs = [yaml.safe_load((tmp_path / "runs" / f"seed-{s}" / "config.yaml").read_text()) for s in (0, 3)]
    assert [c["train"]["seed"] for c in cfgs] == [0, 3]
    assert cfgs[0]["data"] == cfgs[1]["data"]
