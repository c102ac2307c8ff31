"""Bad, odd and hostile image files: loading, limits, the folder scan, skipping at load time."""

import io
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from conftest import SAMPLE, tiny_tuner
from PIL import Image, ImageFile

from tlkit import BadImageError, ImageFolderDataset, load_image
from tlkit.data import skip_none_collate
from tlkit.images import SkippedImageWarning, to_rgb

JPEG = sorted((SAMPLE / "glass").iterdir())[0]  # a real photo shipped with the example
PIL_DEFAULT_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)


def png_claiming(path, width, height):
    """A valid 1x1 PNG whose IHDR (and its CRC) is patched to claim width x height pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature, length, type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over type + data
    path.write_bytes(bytes(data))
    return path


def truncated_jpeg(path, fraction=0.6):
    blob = JPEG.read_bytes()
    path.write_bytes(blob[: int(len(blob) * fraction)])
    return path


def palette_with_transparency():
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (768 - 9))
    im.putpixel((0, 0), 1)  # red, declared transparent below
    im.putpixel((1, 0), 2)  # opaque green
    im.info["transparency"] = 1
    return im


@pytest.mark.parametrize("case", ["L", "LA", "RGBA", "P-transparency", "CMYK-jpeg", "16-bit-png"])
def test_every_mode_becomes_rgb_with_transparency_on_white(tmp_path, case):
    if case == "L":
        im, name, want = Image.new("L", (2, 1), 77), "l.png", [(77, 77, 77), (77, 77, 77)]
    elif case == "LA":
        im = Image.new("LA", (2, 1), (0, 0))  # transparent black -> white
        im.putpixel((1, 0), (0, 255))  # opaque black stays black
        name, want = "la.png", [(255, 255, 255), (0, 0, 0)]
    elif case == "RGBA":
        im = Image.new("RGBA", (2, 1), (255, 0, 0, 0))  # transparent red -> white, not red
        im.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
        name, want = "rgba.png", [(255, 255, 255), (127, 127, 127)]
    elif case == "P-transparency":
        im, name, want = palette_with_transparency(), "p.png", [(255, 255, 255), (0, 255, 0)]
    elif case == "CMYK-jpeg":
        im, name, want = Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "cmyk.jpg", [(255, 0, 0)] * 2
    else:  # 16 bits per pixel: 0..65535 must be scaled to 0..255, not clipped to white
        im = Image.new("I;16", (2, 1), 32896)  # 128 * 257
        im.putpixel((1, 0), 65535)
        name, want = "grey16.png", [(128, 128, 128), (255, 255, 255)]
    im.save(tmp_path / name)
    with Image.open(tmp_path / name) as raw:
        assert raw.mode == {"CMYK-jpeg": "CMYK", "16-bit-png": "I;16", "P-transparency": "P"}.get(case, raw.mode)
    out = load_image(tmp_path / name)
    assert out.mode == "RGB"
    got = [out.getpixel((0, 0)), out.getpixel((out.width - 1, 0))]
    tol = 3 if case == "CMYK-jpeg" else 1  # JPEG is lossy; alpha compositing rounds
    assert np.abs(np.array(got, dtype=int) - np.array(want)).max() <= tol, got


def test_to_rgb_takes_another_background_for_pil_images():
    im = Image.new("RGBA", (1, 1), (255, 0, 0, 0))
    assert to_rgb(im, background=(0, 0, 255)).getpixel((0, 0)) == (0, 0, 255)


def test_truncated_jpeg_has_a_valid_header_but_is_rejected_naming_the_file(tmp_path):
    path = truncated_jpeg(tmp_path / "cut.jpg")
    with Image.open(path) as im:  # the header alone looks fine
        assert im.size == Image.open(JPEG).size
    with pytest.raises(BadImageError, match=r"cut\.jpg: truncated file"):
        load_image(path)


def test_empty_file_is_rejected_naming_the_file(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(BadImageError, match=r"zero\.png: empty file"):
        load_image(tmp_path / "zero.png")


@pytest.mark.parametrize("side", [10_000, 100_000], ids=["above-PIL-warning", "above-PIL-error"])
def test_decompression_bomb_is_rejected_from_the_header_without_global_changes(tmp_path, side):
    path = png_claiming(tmp_path / "bomb.png", side, side)
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BadImageError, match=r"bomb\.png: .*decompression bomb.*not decoded"):
            load_image(path)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters
    # tlkit never relaxes PIL's process-wide protections, neither on import nor on use
    assert Image.MAX_IMAGE_PIXELS == PIL_DEFAULT_MAX_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_pixel_and_byte_limits_apply_before_decoding():
    w, h = Image.open(JPEG).size
    with pytest.raises(BadImageError, match=rf"{JPEG.name}: header claims {w}x{h} .*max_pixels"):
        load_image(JPEG, max_pixels=w * h - 1)
    size = JPEG.stat().st_size
    with pytest.raises(BadImageError, match=rf"{JPEG.name}: file has {size} bytes.*max_bytes"):
        load_image(JPEG, max_bytes=size - 1)
    assert load_image(JPEG, max_pixels=w * h, max_bytes=size).size == (w, h)


def _messy_folder(root):
    """Class folders with every kind of file the scan must handle; returns the bad files."""
    good, other = root / "glass", root / "metal"
    good.mkdir(parents=True)
    other.mkdir()
    photos = sorted((SAMPLE / "glass").iterdir())[:3]
    shutil.copy(photos[0], good / "upper.JPG")
    shutil.copy(photos[1], good / "mixed.Jpeg")
    Image.open(photos[2]).save(good / "shouty.PNG")
    Image.new("L", (20, 20), 9).save(good / "grey.png")
    Image.new("LA", (20, 20), (9, 0)).save(good / "grey_alpha.png")
    Image.new("RGBA", (20, 20), (1, 2, 3, 0)).save(good / "rgba.png")
    palette_with_transparency().save(good / "palette.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(good / "cmyk.jpg")
    Image.new("I;16", (20, 20), 40000).save(good / "sixteen.png")
    bad = {
        "cut.jpg": truncated_jpeg(good / "cut.jpg"),
        "zero.jpg": good / "zero.jpg",
        "bomb.png": png_claiming(other / "bomb.png", 100_000, 100_000),
    }
    bad["zero.jpg"].write_bytes(b"")
    shutil.copy(photos[0], other / "fine.jpg")
    for junk in (".DS_Store", "Thumbs.db", "notes.txt"):
        (good / junk).write_bytes(b"\0junk")
    return bad


def test_scan_reports_every_bad_file_and_skips_it(tmp_path):
    bad = _messy_folder(tmp_path / "data")
    ds = ImageFolderDataset(tmp_path / "data")
    assert len(ds) == 13  # by suffix, any case; junk files are not samples
    report = ds.scan()
    assert {b.path.name: b.reason.split(" (")[0] for b in report.bad} == {
        "cut.jpg": "truncated file",
        "zero.jpg": "empty file",
        "bomb.png": "refused by PIL as a possible decompression bomb",  # PIL's own limit comes first here
    }
    assert sorted(p.name for p in report.ignored) == [".DS_Store", "Thumbs.db", "notes.txt"]
    assert report.checked == 13 and not report.ok and ds.scan_report is report
    assert len(ds) == 10 and not {p for p, _ in ds.samples} & set(bad.values())
    assert {p.name for p, _ in ds.samples} >= {"upper.JPG", "mixed.Jpeg", "shouty.PNG", "sixteen.png"}
    summary = report.summary()
    for path in bad.values():
        assert str(path) in summary
    assert "ignored 3 non-image file(s)" in summary
    for path, _ in ds.samples:  # whatever passed the scan loads
        assert load_image(path).mode == "RGB"


def test_strict_mode_fails_before_training_listing_every_bad_file(tmp_path):
    bad = _messy_folder(tmp_path / "data")
    ds = ImageFolderDataset(tmp_path / "data", bad_images="error")
    with pytest.raises(BadImageError) as info:
        tiny_tuner(ds.classes, output_dir=tmp_path / "run").fit(ds)
    for path in bad.values():
        assert str(path) in str(info.value)
    assert not (tmp_path / "run").exists()  # nothing was trained or written


def test_fit_skips_bad_files_and_prints_the_summary(tmp_path, capsys):
    bad = _messy_folder(tmp_path / "data")
    ds = ImageFolderDataset(tmp_path / "data")
    history = tiny_tuner(ds.classes, epochs=1).fit(ds, ds)
    err = capsys.readouterr().err
    assert all(str(p) in err for p in bad.values())
    assert sum(map(sum, history[0]["confusion_matrix"])) == 10  # evaluated on the usable files only


def test_class_folder_without_images_is_an_error_naming_it_unless_allowed(tmp_path):
    root = tmp_path / "data"
    _messy_folder(root)
    (root / "paper").mkdir()
    (root / "paper" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"paper: class folder holds no images"):
        ImageFolderDataset(root)
    ds = ImageFolderDataset(root, allow_empty_classes=True)
    assert ds.classes == ["glass", "metal", "paper"] and ds.class_counts()["paper"] == 0
    # metal's only other file is the bomb: a class left without usable images is named too
    shutil.rmtree(root / "paper")
    (root / "metal" / "fine.jpg").unlink()
    with pytest.raises(ValueError, match=r"no usable image left in class folder\(s\) \[.*metal'\]"):
        ImageFolderDataset(root).scan()
    report = ImageFolderDataset(root, allow_empty_classes=True).scan()
    assert report.empty_classes == ["metal"]


def test_a_file_that_breaks_after_the_scan_is_skipped_not_fatal(tmp_path):
    root = tmp_path / "data"
    for c in ("glass", "metal"):
        (root / c).mkdir(parents=True)
        for f in sorted((SAMPLE / c).iterdir())[:4]:
            shutil.copy(f, root / c / f.name)
    ds = ImageFolderDataset(root)
    ds.scan()
    broken = ds.samples[1][0]
    truncated_jpeg(broken)  # damaged after the scan, e.g. by a sync tool
    with pytest.warns(SkippedImageWarning, match=broken.name):
        assert ds[1] is None
    assert ds[0][1] == 0
    assert skip_none_collate([None, None]) is None
    x = torch.zeros(3, 2, 2)
    batch = skip_none_collate([None, (x, 1), None, (x + 1, 0)])
    assert batch[0].shape == (2, 3, 2, 2) and batch[1].tolist() == [1, 0]
    # DataLoader worker processes hand the None on; the epoch completes with 7 images
    tuner = tiny_tuner(ds.classes, epochs=1, num_workers=2, batch_size=2)
    history = tuner.fit(ds, ds)
    assert sum(map(sum, history[0]["confusion_matrix"])) == 7
    strict = ImageFolderDataset(root, bad_images="error")
    strict.scan_report = ds.scan_report  # as if scanned before the damage
    with pytest.raises(BadImageError, match=broken.name):
        tiny_tuner(ds.classes, epochs=1).fit(strict)


def test_predict_bounds_pixels_and_bytes_of_untrusted_files(tmp_path):
    tuner = tiny_tuner(["a", "b"])
    with pytest.raises(BadImageError, match=rf"{JPEG.name}: .*max_pixels"):
        tuner.predict(JPEG, max_pixels=1000, on_error="raise")
    with pytest.raises(BadImageError, match=rf"{JPEG.name}: .*max_bytes"):
        tuner.predict([JPEG], max_bytes=1000, on_error="raise")
    bomb = png_claiming(tmp_path / "bomb.png", 10_000, 10_000)
    with pytest.raises(BadImageError, match=r"bomb\.png: header claims 10000x10000"):
        tuner.predict([JPEG, bomb], on_error="raise")
    # by default the bomb costs only its own prediction, reported as a warning naming it
    with pytest.warns(SkippedImageWarning, match=r"bomb\.png: header claims 10000x10000"):
        preds = tuner.predict([bomb, JPEG])
    assert [p.path for p in preds] == [str(JPEG)]
    # a transparent PIL image is composited onto white, the same as a file would be
    clear = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    assert tuner.predict(clear)[0].probabilities == tuner.predict(white)[0].probabilities


def test_draft_decodes_large_jpegs_at_reduced_scale_with_nearly_the_same_eval_input(tmp_path):
    from tlkit.data import create_transforms

    photo = Image.open(sorted((SAMPLE / "glass").iterdir())[0]).convert("RGB")
    assert photo.size == (256, 341)
    big = tmp_path / "big.jpg"
    photo.resize((1024, 1364), Image.BICUBIC).save(big, quality=92)
    png = tmp_path / "big.png"
    photo.resize((1024, 1364), Image.BICUBIC).save(png)
    # 1024 // 256 = 4 and 1364 // 256 = 5: libjpeg decodes at 1/4, both sides still >= 256
    assert load_image(big, draft_size=256).size == (256, 341)
    assert load_image(big, draft_size=300).size == (512, 682)  # 1/4 would leave 256 < 300
    assert load_image(big).size == (1024, 1364)
    assert load_image(png, draft_size=256).size == (1024, 1364)  # only JPEG has DCT scaling
    small = sorted((SAMPLE / "glass").iterdir())[0]
    assert load_image(small, draft_size=256).size == (256, 341)  # under 2x: decoded in full
    cfg = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
           "mean": (0.5,) * 3, "std": (0.5,) * 3}
    _, evaluation = create_transforms(cfg)
    full, draft = evaluation(load_image(big)), evaluation(load_image(big, draft_size=256))
    assert full.shape == draft.shape == (3, 224, 224)
    assert not torch.equal(full, draft)
    assert float((full - draft).abs().mean()) < 0.005  # inputs span [-1, 1]
