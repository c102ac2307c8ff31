"""Datasets from a `DatasetConfig`: class folders or a label table, split into train, validation and test.

Above both `tlkit.data` (folders, splits) and `tlkit.table` (CSV/JSON label tables), so neither
needs the other's loader.
"""

from __future__ import annotations

from typing import Literal

from tlkit.config import DatasetConfig
from tlkit.data import ImageFolderDataset, stratified_kfold, stratified_split
from tlkit.table import LabelTableDataset, read_label_table

__all__ = ["load_datasets", "load_split"]


def load_datasets(config: DatasetConfig) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Train and validation datasets from a `DatasetConfig`.

    With ``val_root`` the two folders are used as they are (validation classes matched by name);
    with ``num_folds`` set, fold ``fold`` of `stratified_kfold`; otherwise ``root`` is split by
    `stratified_split`.

    Raises:
        ValueError: ``root`` is not set, or as `ImageFolderDataset`.
    """
    if config.labels is not None:
        return _table_datasets(config)
    if config.root is None:
        raise ValueError("data.root is not set: give the folder that holds one sub-folder per class")
    options = dict(bad_images=config.bad_images, allow_empty_classes=config.allow_empty_classes)
    full = ImageFolderDataset(config.root, classes=config.classes, **options)
    if config.val_root is not None:
        return full, ImageFolderDataset(config.val_root, classes=full.classes, allow_missing_classes=True, **options)
    if config.num_folds is not None:
        return stratified_kfold(full, config.num_folds, config.fold, config.split_seed)
    return stratified_split(full, config.val_fraction, config.split_seed)


def _table_datasets(config: DatasetConfig) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Train and validation sets of a label table: its split column, else a stratified split of
    its train rows (its test rows never train; `load_split` reads them)."""
    table = read_label_table(config.labels, root=config.root, path_column=config.path_column,
                             label_column=config.label_column, label_columns=config.label_columns)
    options = dict(bad_images=config.bad_images, allow_empty_classes=config.allow_empty_classes)
    classes = config.classes or table.labels
    splits = {r.split for r in table.rows}
    if "val" in splits:
        return (LabelTableDataset(table, classes=classes, split="train", **options),
                LabelTableDataset(table, classes=classes, split="val", allow_missing_classes=True, **options))
    full = LabelTableDataset(table, classes=classes, split="train" if "train" in splits else None, **options)
    if config.num_folds is not None:
        return stratified_kfold(full, config.num_folds, config.fold, config.split_seed)
    return stratified_split(full, config.val_fraction, config.split_seed)


def load_split(config: DatasetConfig, name: Literal["train", "val", "test"]) -> ImageFolderDataset:
    """One split of a `DatasetConfig`: ``train`` or ``val`` as `load_datasets` makes them, or ``test``:
    a label table's rows whose split column says ``test``.

    Raises:
        ValueError: ``test`` without a label table that has test rows.
    """
    if name != "test":
        train, val = load_datasets(config)
        return train if name == "train" else val
    if config.labels is None:
        raise ValueError("--split test needs a label table with a split column (data.labels); pass --data FOLDER")
    table = read_label_table(config.labels, root=config.root, path_column=config.path_column,
                             label_column=config.label_column, label_columns=config.label_columns)
    return LabelTableDataset(table, classes=config.classes or table.labels, split="test", allow_missing_classes=True,
                             bad_images=config.bad_images)
