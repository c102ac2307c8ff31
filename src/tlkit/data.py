"""Image-folder datasets, stratified splits and timm transforms from a data config."""

from __future__ import annotations

import copy
import math
import random
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from tlkit.config import AugmentConfig
from tlkit.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    BadImageError,
    ScanReport,
    SkippedImageWarning,
    find_bad_images,
    load_image,  # noqa: F401 - ``from tlkit.data import load_image`` predates tlkit.images
)

__all__ = [
    "ImageFolderDataset",
    "is_metadata_folder",
    "natural_key",
    "skip_none_collate",
    "stratified_split",
    "stratified_kfold",
    "create_transforms",
    "eval_resize_size",
]


_METADATA_FOLDERS = {"@eadir", "$recycle.bin", "recycler", "system volume information", "lost+found"}


def is_metadata_folder(name: str) -> bool:
    """Whether a folder name is OS or tool metadata, never a class.

    ``__MACOSX`` (zip files made on a Mac) and every name starting with ``.`` or ``_``
    (``.git``, ``.ipynb_checkpoints``, ``__pycache__``), Synology's ``@eaDir``, Windows'
    ``$RECYCLE.BIN`` and ``System Volume Information``, and ``lost+found``.
    """
    return name[:1] in {".", "_"} or name.lower() in _METADATA_FOLDERS


def natural_key(name: str) -> list:
    """Sort key that orders digits by value (``class2`` before ``class10``), case-insensitively.

    The order of timm's folder reader (``timm.data.readers.reader_image_folder`` sorts class
    names with the same ``natural_key``), so tlkit and timm give a folder the same class indices.
    """
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def skip_none_collate(batch: list[Any]) -> Any:
    """``default_collate`` over the items that are not ``None``; ``None`` when none are left.

    `ImageFolderDataset` returns ``None`` for a file that fails to load in ``"skip"`` mode; this
    collate function drops it, so a bad file costs one sample, never the epoch (also inside
    DataLoader worker processes). `FineTuner` skips a ``None`` batch.
    """
    items = [b for b in batch if b is not None]
    return torch.utils.data.default_collate(items) if items else None


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in ``root/<class>/<image>``, labelled by folder.

    Items are ``(image, label)``: a PIL RGB image, or whatever ``transform`` makes of it (for
    tlkit's transforms a float32 tensor ``(3, H, W)`` normalised by the data config), and the
    class index (int). Images are read with `tlkit.load_image` (size limits, transparency onto
    white, 16-bit scaled, EXIF orientation).

    Files count as images by suffix, case-insensitively (`IMAGE_EXTENSIONS`: ``.jpg``,
    ``.JPG``, ``.Jpeg``, ``.png``...); other files in class folders (``.DS_Store``,
    ``Thumbs.db``, ``notes.txt``) and hidden files are ignored and listed in ``ignored``.
    Whether an image file actually decodes is checked by `scan`, which `FineTuner.fit` runs
    before training.

    Args:
        root: the folder holding one sub-folder per class.
        classes: class names in index order. By default the sub-folder names in `natural_key`
            order (timm's: ``class2`` before ``class10``), metadata folders (`is_metadata_folder`:
            ``__MACOSX``, ``.git``, ``@eaDir``...) left out and listed in ``ignored_folders``. When given
            (e.g. a checkpoint's classes), folders are matched by name whatever their order on
            disk, and a folder with a name not in ``classes`` is an error.
        transform: applied to each PIL image.
        allow_missing_classes: accept ``classes`` without a folder (evaluation on a subset).
        bad_images: ``"skip"`` (default): `scan` drops unusable files and reports them, and a
            file that still fails when loaded makes the item ``None`` (dropped by
            `skip_none_collate`) with a `SkippedImageWarning`; ``"error"``: `scan` raises
            listing every bad file, and a load failure raises.
        allow_empty_classes: keep a class whose folder has no (usable) image instead of raising.
        max_pixels: largest accepted width x height of an image (see `tlkit.load_image`).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no class folders, an unknown class folder, a class folder without images
            (naming it; unless ``allow_empty_classes``), an unknown ``bad_images`` mode.
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str] | None = None,
        transform: Callable | None = None,
        allow_missing_classes: bool = False,
        *,
        bad_images: Literal["skip", "error"] = "skip",
        allow_empty_classes: bool = False,
        max_pixels: int | None = MAX_PIXELS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        if bad_images not in ("skip", "error"):
            raise ValueError(f"bad_images must be 'skip' or 'error', got {bad_images!r}")
        subdirs = [p.name for p in self.root.iterdir() if p.is_dir()]
        self.ignored_folders: list[str] = sorted(n for n in subdirs if is_metadata_folder(n))
        folders = sorted((n for n in subdirs if not is_metadata_folder(n)), key=natural_key)
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
        self.bad_images = bad_images
        self.allow_empty_classes = allow_empty_classes
        self.max_pixels = max_pixels
        self.draft_size: int | None = None  # see with_transform
        self.samples: list[tuple[Path, int]] = []
        self.ignored: list[Path] = []
        self.scan_report: ScanReport | None = None
        for index, name in enumerate(classes):
            if name not in folders:
                continue
            files = sorted(p for p in (self.root / name).iterdir() if p.is_file())
            images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
            self.ignored += sorted(set(files) - set(images))
            if not images and not allow_empty_classes:
                raise ValueError(
                    f"{self.root / name}: class folder holds no images (suffixes {sorted(IMAGE_EXTENSIONS)}, "
                    "any case); add images, remove the folder, or pass allow_empty_classes=True"
                )
            self.samples += [(p, index) for p in images]

    def scan(self) -> ScanReport:
        """Decode every sample once and drop the files that cannot be used.

        Runs once per dataset (`FineTuner.fit` calls it before training unless
        ``scan_report`` is already set); the result is kept in ``scan_report``. Costs one full
        decode per file.

        Returns:
            The `ScanReport`: every bad file with its path and reason, the ignored non-image
            files, classes left empty.

        Raises:
            BadImageError: ``bad_images="error"`` and some file is bad (the message lists all).
            ValueError: a class that had images has none left, naming its folder (unless
                ``allow_empty_classes``).
        """
        bad = find_bad_images([p for p, _ in self.samples], max_pixels=self.max_pixels)
        report = ScanReport(self.root, checked=len(self.samples), bad=bad, ignored=list(self.ignored))
        if bad and self.bad_images == "error":
            raise BadImageError(f"{self.root}: {len(bad)} unusable image file(s) (bad_images='error'):\n"
                                + report.summary())
        bad_paths = {b.path for b in bad}
        before = {label for _, label in self.samples}
        self.samples = [(p, label) for p, label in self.samples if p not in bad_paths]
        after = {label for _, label in self.samples}
        report.empty_classes = [self.classes[i] for i in sorted(before - after)]
        if report.empty_classes and not self.allow_empty_classes:
            folders = [str(self.root / c) for c in report.empty_classes]
            raise ValueError(f"no usable image left in class folder(s) {folders}:\n" + report.summary())
        self.scan_report = report
        return report

    @property
    def targets(self) -> list[int]:
        """Class index of every sample, in order."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        """The item at ``index``; ``None`` if its file fails to load and ``bad_images="skip"``.

        Raises:
            BadImageError: the file fails to load and ``bad_images="error"``.
        """
        path, label = self.samples[index]
        try:
            image = load_image(path, max_pixels=self.max_pixels, draft_size=self.draft_size)
        except BadImageError as e:
            if self.bad_images == "error":
                raise
            # Changed or damaged since the scan: drop this sample, keep the epoch going.
            warnings.warn(f"skipped: {e}", SkippedImageWarning, stacklevel=2)
            return None
        return (self.transform(image) if self.transform else image), label

    def subset(self, indices: Sequence[int]) -> ImageFolderDataset:
        """A dataset of the samples at ``indices``, same classes and transform."""
        out = copy.copy(self)
        out.samples = [self.samples[i] for i in indices]
        return out

    def with_transform(self, transform: Callable | None, draft_size: int | None = None) -> ImageFolderDataset:
        """A shallow copy with another transform (the samples list is shared, not copied).

        Args:
            transform: maps a PIL RGB image to the model input.
            draft_size: passed to `tlkit.load_image`: JPEGs are decoded at reduced scale while
                both sides stay at least this many pixels. Only for an eval transform that
                resizes the shorter side to ``draft_size`` or less; ``None`` decodes in full.
        """
        out = copy.copy(self)
        out.transform = transform
        out.draft_size = draft_size
        return out

    def class_counts(self) -> dict[str, int]:
        """Number of samples per class name."""
        counts = dict.fromkeys(self.classes, 0)
        for _, label in self.samples:
            counts[self.classes[label]] += 1
        return counts


def _shuffled_by_class(dataset: ImageFolderDataset, seed: int) -> list[list[int]]:
    # Sample indices of each class (in class order), shuffled by one random.Random(seed).
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(dataset.samples):
        by_class.setdefault(label, []).append(i)
    out = []
    for label in sorted(by_class):
        idx = by_class[label][:]
        rng.shuffle(idx)
        out.append(idx)
    return out


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
    train_idx: list[int] = []
    val_idx: list[int] = []
    for idx in _shuffled_by_class(dataset, seed):
        n_val = round(len(idx) * val_fraction)
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val_idx += idx[:n_val]
        train_idx += idx[n_val:]
    return dataset.subset(sorted(train_idx)), dataset.subset(sorted(val_idx))


def stratified_kfold(
    dataset: ImageFolderDataset, num_folds: int = 5, fold: int = 0, seed: int = 0
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Fold ``fold`` of a stratified ``num_folds``-fold cross-validation: ``(train, val)``.

    Each class's sorted file list is shuffled by ``random.Random(seed)`` and dealt round-robin
    into the folds, so fold sizes per class differ by at most one, every image is in exactly
    one validation fold, and the folds depend only on the file names and the seed (the
    protocol of scikit-learn's ``StratifiedKFold(shuffle=True)``).

    Raises:
        ValueError: ``num_folds < 2`` or ``fold`` outside ``[0, num_folds)``.
    """
    if num_folds < 2:
        raise ValueError(f"num_folds must be at least 2, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}")
    train_idx: list[int] = []
    val_idx: list[int] = []
    for idx in _shuffled_by_class(dataset, seed):
        for k, i in enumerate(idx):
            (val_idx if k % num_folds == fold else train_idx).append(i)
    return dataset.subset(sorted(train_idx)), dataset.subset(sorted(val_idx))


def eval_resize_size(data_config: dict[str, Any]) -> int:
    """Shortest side, in pixels, timm's eval transform resizes an image to before cropping.

    ``floor(min(H, W) / crop_pct)`` as in ``timm.data.transforms_imagenet_eval``: the smallest
    decode size (see `tlkit.load_image`'s ``draft_size``) that leaves the eval pipeline's input
    resolution unchanged.
    """
    _, h, w = data_config["input_size"]
    return math.floor(min(h, w) / (data_config.get("crop_pct") or 0.875))


def create_transforms(
    data_config: dict[str, Any], augment: AugmentConfig | None = None
) -> tuple[Callable, Callable]:
    """Training and evaluation transforms from timm's ``create_transform``.

    Args:
        data_config: as returned by `tlkit.resolve_data_config`.
        augment: training augmentation (background swap, random-resized crop, flips, colour
            jitter, auto-augment, random erasing).

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
    trivial = augment.auto_augment == "trivialaugment"
    train = create_transform(
        **common,
        is_training=True,
        scale=tuple(augment.scale),
        ratio=tuple(augment.ratio),
        hflip=augment.hflip,
        vflip=augment.vflip,
        color_jitter=augment.color_jitter if augment.color_jitter > 0 and not trivial else None,
        auto_augment=None if trivial else augment.auto_augment,
        re_prob=augment.re_prob,
        separate=trivial,
    )
    if trivial:
        # timm has no TrivialAugment; torchvision's sits between timm's crop/flip and its
        # to-tensor/normalise stages, where timm puts its own auto-augment.
        from torchvision import transforms as T

        primary, _, final = train
        interpolation = T.InterpolationMode.BICUBIC if data_config["interpolation"] == "bicubic" else T.InterpolationMode.BILINEAR
        train = T.Compose([*primary.transforms, T.TrivialAugmentWide(interpolation=interpolation), *final.transforms])
    if augment.background > 0:
        # Before timm's crop: the swap composes the whole frame, which the crop then samples.
        from torchvision import transforms as T

        from tlkit.background import BackgroundSwap

        train = T.Compose([BackgroundSwap(augment.background), train])
    evaluation = create_transform(
        **common,
        is_training=False,
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode", "center"),
    )
    return train, evaluation
