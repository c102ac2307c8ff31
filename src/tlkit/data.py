"""Image-folder datasets, stratified splits and timm transforms from a data config."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tlkit.config import AugmentConfig, DatasetConfig

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "load_image",
    "stratified_split",
    "load_datasets",
    "create_transforms",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
"""File suffixes read as images, compared case-insensitively (``.JPG`` counts)."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied.

    Raises:
        ValueError: the file cannot be decoded (names the file and the reason).
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in ``root/<class>/<image>``, labelled by folder.

    Items are ``(image, label)``: a PIL RGB image, or whatever ``transform`` makes of it (for
    tlkit's transforms a float32 tensor ``(3, H, W)`` normalised by the data config), and the
    class index (int).

    Args:
        root: the folder holding one sub-folder per class.
        classes: class names in index order. By default the sorted sub-folder names. When given
            (e.g. a checkpoint's classes), folders are matched by name whatever their order on
            disk, and a folder with a name not in ``classes`` is an error.
        transform: applied to each PIL image.
        allow_missing_classes: accept ``classes`` without a folder (evaluation on a subset).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no class folders, an unknown class folder, a class folder without images.
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str] | None = None,
        transform: Callable | None = None,
        allow_missing_classes: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"{self.root}: no class folders (expected root/<class>/<image>)")
        if classes is None:
            classes = folders
        classes = list(classes)
        unknown = [f for f in folders if f not in classes]
        if unknown:
            raise ValueError(f"{self.root}: folder(s) {unknown} are not among the classes {classes}")
        missing = [c for c in classes if c not in folders]
        if missing and not allow_missing_classes:
            raise ValueError(f"{self.root}: no folder for class(es) {missing}")
        self.classes: list[str] = classes
        self.transform = transform
        self.samples: list[tuple[Path, int]] = []
        for index, name in enumerate(classes):
            if name not in folders:
                continue
            files = sorted(
                p for p in (self.root / name).iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
            if not files:
                raise ValueError(f"{self.root / name}: class folder holds no images")
            self.samples += [(p, index) for p in files]

    @property
    def targets(self) -> list[int]:
        """Class index of every sample, in order."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_image(path)
        return (self.transform(image) if self.transform else image), label

    def subset(self, indices: Sequence[int]) -> ImageFolderDataset:
        """A dataset of the samples at ``indices``, same classes and transform."""
        out = copy.copy(self)
        out.samples = [self.samples[i] for i in indices]
        return out

    def with_transform(self, transform: Callable | None) -> ImageFolderDataset:
        """A shallow copy with another transform (the samples list is shared, not copied)."""
        out = copy.copy(self)
        out.transform = transform
        return out

    def class_counts(self) -> dict[str, int]:
        """Number of samples per class name."""
        counts = dict.fromkeys(self.classes, 0)
        for _, label in self.samples:
            counts[self.classes[label]] += 1
        return counts


def stratified_split(
    dataset: ImageFolderDataset, val_fraction: float = 0.2, seed: int = 0
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Split into train and validation sets with the same class proportions.

    Each class contributes ``round(n_class * val_fraction)`` images to validation (at least one
    when it has two or more), chosen by a ``random.Random(seed)`` shuffle of the sorted file
    list, so the split depends only on the file names and the seed.

    Raises:
        ValueError: ``val_fraction`` outside (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(dataset.samples):
        by_class.setdefault(label, []).append(i)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label in sorted(by_class):
        idx = by_class[label][:]
        rng.shuffle(idx)
        n_val = round(len(idx) * val_fraction)
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val_idx += idx[:n_val]
        train_idx += idx[n_val:]
    return dataset.subset(sorted(train_idx)), dataset.subset(sorted(val_idx))


def load_datasets(config: DatasetConfig) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Train and validation datasets from a `DatasetConfig`.

    With ``val_root`` the two folders are used as they are (validation classes matched by name);
    otherwise ``root`` is split by `stratified_split`.

    Raises:
        ValueError: ``root`` is not set, or as `ImageFolderDataset`.
    """
    if config.root is None:
        raise ValueError("data.root is not set: give the folder that holds one sub-folder per class")
    full = ImageFolderDataset(config.root, classes=config.classes)
    if config.val_root is not None:
        return full, ImageFolderDataset(config.val_root, classes=full.classes, allow_missing_classes=True)
    return stratified_split(full, config.val_fraction, config.split_seed)


def create_transforms(
    data_config: dict[str, Any], augment: AugmentConfig | None = None
) -> tuple[Callable, Callable]:
    """Training and evaluation transforms from timm's ``create_transform``.

    Args:
        data_config: as returned by `tlkit.resolve_data_config`.
        augment: training augmentation (random-resized crop, flips, colour jitter).

    Returns:
        ``(train_transform, eval_transform)``; both map a PIL RGB image to a float32 tensor
        ``(3, H, W)`` normalised with the config's mean and std. The eval transform resizes to
        ``H / crop_pct`` and centre-crops (timm's eval pipeline).
    """
    from timm.data import create_transform

    augment = augment or AugmentConfig()
    common = dict(
        input_size=tuple(data_config["input_size"]),
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
    )
    train = create_transform(
        **common,
        is_training=True,
        scale=tuple(augment.scale),
        ratio=tuple(augment.ratio),
        hflip=augment.hflip,
        vflip=augment.vflip,
        color_jitter=augment.color_jitter if augment.color_jitter > 0 else None,
    )
    evaluation = create_transform(
        **common,
        is_training=False,
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode", "center"),
    )
    return train, evaluation
