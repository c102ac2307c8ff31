import pytest
import torch
from conftest import SMALL, copy_sample
from PIL import Image

from tlkit import AugmentConfig, ImageFolderDataset, load_image, stratified_split
from tlkit.data import create_transforms


def test_classes_sorted_and_labels_by_folder(image_root):
    ds = ImageFolderDataset(image_root)
    assert ds.classes == ["cardboard", "glass", "metal"]
    assert ds.class_counts() == {"cardboard": 4, "glass": 4, "metal": 4}
    assert all(p.parent.name == ds.classes[label] for p, label in ds.samples)


def test_explicit_class_order_is_matched_by_name(image_root):
    ds = ImageFolderDataset(image_root, classes=["metal", "cardboard", "glass"])
    assert all(p.parent.name == ds.classes[label] for p, label in ds.samples)
    assert ds.targets.count(0) == 4


def test_unknown_and_missing_class_folders(image_root):
    with pytest.raises(ValueError, match="metal"):
        ImageFolderDataset(image_root, classes=["cardboard", "glass"])
    with pytest.raises(ValueError, match="plastic"):
        ImageFolderDataset(image_root, classes=["cardboard", "glass", "metal", "plastic"])
    ds = ImageFolderDataset(image_root, classes=["cardboard", "glass", "metal", "plastic"], allow_missing_classes=True)
    assert len(ds) == 12


def test_empty_class_folder_is_named(image_root):
    (image_root / "paper").mkdir()
    (image_root / "paper" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="paper"):
        ImageFolderDataset(image_root)


def test_extensions_case_insensitive_and_non_images_skipped(image_root):
    src = next((image_root / "glass").iterdir())
    src.rename(src.with_suffix(".JPG"))
    (image_root / "glass" / ".DS_Store").write_bytes(b"\0\1")
    (image_root / "glass" / "Thumbs.db").write_bytes(b"\0\1")
    ds = ImageFolderDataset(image_root)
    names = {p.name for p, _ in ds.samples}
    assert src.with_suffix(".JPG").name in names and "Thumbs.db" not in names and len(ds) == 12


def test_missing_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")


def test_exif_orientation_and_rgb(tmp_path):
    im = Image.new("L", (40, 20), 128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    loaded = load_image(tmp_path / "rot.jpg")
    assert loaded.mode == "RGB" and loaded.size == (20, 40)


def test_broken_image_names_the_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg")


def test_stratified_split_is_seeded_disjoint_and_proportional(tmp_path):
    root = copy_sample(tmp_path / "imgs", ("cardboard", "glass", "trash"), per_class=10)
    ds = ImageFolderDataset(root)
    train, val = stratified_split(ds, 0.3, seed=7)
    assert {p for p, _ in train.samples}.isdisjoint({p for p, _ in val.samples})
    assert len(train) + len(val) == 30
    assert val.class_counts() == {"cardboard": 3, "glass": 3, "trash": 3}
    again = stratified_split(ds, 0.3, seed=7)[1]
    other = stratified_split(ds, 0.3, seed=8)[1]
    assert again.samples == val.samples and other.samples != val.samples


def test_transforms_follow_the_data_config(image_root):
    train_tf, eval_tf = create_transforms(SMALL, AugmentConfig())
    image = load_image(next((image_root / "glass").iterdir()))
    x = eval_tf(image)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert torch.equal(eval_tf(image), x)  # deterministic
    # mean = std = 0.5 maps [0, 1] pixels to [-1, 1]
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6
    torch.manual_seed(0)
    assert train_tf(image).shape == (3, 64, 64)
    assert not torch.equal(train_tf(image), train_tf(image))  # augmentation is random


def test_os_metadata_folders_are_never_classes(image_root):
    import shutil

    mac = image_root / "__MACOSX" / "cardboard"
    mac.mkdir(parents=True)
    shutil.copy(next((image_root / "cardboard").iterdir()), mac / "._x.jpg")
    for name in ("@eaDir", "$RECYCLE.BIN", ".ipynb_checkpoints", "_trash"):
        (image_root / name).mkdir()
        shutil.copy(next((image_root / "glass").iterdir()), image_root / name / "y.jpg")
    ds = ImageFolderDataset(image_root)
    assert ds.classes == ["cardboard", "glass", "metal"]
    assert not [p for p, _ in ds.samples if "MACOSX" in str(p) or "@eaDir" in str(p)]
    assert ds.ignored_folders == sorted(["$RECYCLE.BIN", ".ipynb_checkpoints", "@eaDir", "_trash", "__MACOSX"])


def test_class_order_is_timms_natural_order(tmp_path):
    from timm.data.readers.reader_image_folder import find_images_and_targets

    for n in ["class10", "class2", "Class1", "class1b"]:
        copy_sample(tmp_path / n, ("cardboard",), 1)
        (tmp_path / n / "cardboard" / next((tmp_path / n / "cardboard").iterdir()).name).rename(tmp_path / n / "a.jpg")
        (tmp_path / n / "cardboard").rmdir()
    ours = ImageFolderDataset(tmp_path).classes
    _, timm_classes = find_images_and_targets(str(tmp_path))
    assert ours == sorted(timm_classes, key=timm_classes.get) == ["Class1", "class1b", "class2", "class10"]
