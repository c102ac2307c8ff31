"""Reading image files that may be broken, huge or hostile, and reporting the bad ones.

Every image tlkit reads (training, evaluation, `FineTuner.predict`, the folder scan) goes
through `load_image`:

- **limits before decoding**: the file's size in bytes (``max_bytes``) and the pixel count its
  header claims (``max_pixels``) are checked before any pixel is decoded, so a decompression
  bomb (a small file whose header claims e.g. 100000 x 100000 pixels) costs nothing;
- **one error type**: anything that goes wrong (empty, truncated or corrupted file, not an
  image, unsupported mode, over a limit) raises `BadImageError`, a ``ValueError`` whose message
  starts with the file's path and gives the reason;
- **one output format**: 8-bit RGB, EXIF orientation applied. Transparent pixels are
  composited onto a white background, 16-bit images are scaled to 8 bits (not clipped), CMYK
  and palette images are converted.

No process-wide PIL setting is changed by importing or using tlkit: ``Image.MAX_IMAGE_PIXELS``
and ``ImageFile.LOAD_TRUNCATED_IMAGES`` keep their values; PIL's own decompression-bomb warning
is silenced only inside `load_image` (``warnings.catch_warnings``) and its error is caught there.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "MAX_BYTES",
    "BACKGROUND",
    "BadImageError",
    "BadImage",
    "ScanReport",
    "SkippedImageWarning",
    "load_image",
    "to_rgb",
    "find_bad_images",
    "expand_image_paths",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
"""File suffixes read as images, compared case-insensitively (``.JPG`` and ``.Jpeg`` count)."""

MAX_PIXELS = 89_478_485
"""Default pixel limit (width x height) of `load_image`: PIL's own warning threshold, about
0.27 GB of RGB pixels. Above twice PIL's ``Image.MAX_IMAGE_PIXELS`` PIL itself refuses to open a
file, whatever this limit says."""

MAX_BYTES = 512 * 2**20
"""Default file-size limit of `load_image`, in bytes (512 MiB)."""

BACKGROUND = (255, 255, 255)
"""The colour (white) that transparent pixels are composited onto."""

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}


class BadImageError(ValueError):
    """An image file cannot be used: unreadable, empty, truncated, corrupted or over a limit.

    The message starts with the file's path.
    """


class SkippedImageWarning(UserWarning):
    """A file that failed to load during training or evaluation was skipped (``bad_images="skip"``)."""


@dataclass(frozen=True)
class BadImage:
    """One file that cannot be used, and why.

    Attributes:
        path: the file.
        reason: what went wrong (the `BadImageError` message without the path).
    """

    path: Path
    reason: str


@dataclass
class ScanReport:
    """What a scan of an image folder found (see `tlkit.ImageFolderDataset.scan`).

    Attributes:
        root: the scanned folder.
        checked: number of image files decoded.
        bad: files with an image suffix that cannot be used, in sample order.
        ignored: files in class folders that are not images by name (``.DS_Store``,
            ``Thumbs.db``, ``notes.txt``, hidden files such as ``._photo.jpg``); never read.
        empty_classes: classes whose every image file turned out bad (allowed only with
            ``allow_empty_classes=True``).
    """

    root: Path
    checked: int = 0
    bad: list[BadImage] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every image file is usable."""
        return not self.bad

    def summary(self) -> str:
        """A human-readable report: one line per bad file (path and reason), then the ignored files."""
        lines = [f"scanned {self.checked} image files in {self.root}: {self.checked - len(self.bad)} usable, "
                 f"{len(self.bad)} bad"]
        lines += [f"  bad: {b.path}: {b.reason}" for b in self.bad]
        if self.empty_classes:
            lines.append(f"  classes without usable images: {self.empty_classes}")
        if self.ignored:
            names = ", ".join(str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p)
                              for p in self.ignored[:10])
            more = f" and {len(self.ignored) - 10} more" if len(self.ignored) > 10 else ""
            lines.append(f"  ignored {len(self.ignored)} non-image file(s): {names}{more}")
        return "\n".join(lines)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB.

    - alpha (``RGBA``, ``LA``, ``PA``) and palette or grey images with a transparent colour:
      composited onto ``background`` (white by default), so a transparent pixel becomes white
      and a half-transparent black one mid-grey; PIL's plain ``convert("RGB")`` would instead
      show whatever colour the transparent pixels happen to store;
    - 16-bit grey (``I;16*``, and ``I`` with values above 255): scaled by 255/65535, where
      PIL's conversion clips everything above 255 to white;
    - everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``F``...) through
      ``convert("RGB")``.

    Raises:
        ValueError: PIL cannot convert the mode.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT or mode == "I":
        a = np.asarray(image).astype(np.float64)
        if mode in _SIXTEEN_BIT or (a.size and a.max() > 255):
            a = a * (255.0 / 65535.0)
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    path: str | Path,
    *,
    max_pixels: int | None = MAX_PIXELS,
    max_bytes: int | None = MAX_BYTES,
    background: tuple[int, int, int] = BACKGROUND,
    draft_size: int | None = None,
) -> Image.Image:
    """Open an untrusted image file as 8-bit RGB with its EXIF orientation applied.

    Args:
        path: the file.
        max_pixels: largest accepted width x height, checked on the header before decoding;
            ``None`` leaves only PIL's own limit (twice ``Image.MAX_IMAGE_PIXELS``).
        max_bytes: largest accepted file size in bytes; ``None`` for no limit.
        background: RGB colour that transparent pixels are composited onto (see `to_rgb`).
        draft_size: shortest side, in pixels, the caller will resize to. A JPEG at least twice
            that size on both sides is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling
            (PIL ``Image.draft``), the smallest scale that keeps both sides ``>= draft_size``;
            other formats are decoded in full. ``None`` (default): always full size. Only for
            a resize-then-crop eval pipeline: the pixels differ slightly from a full decode.

    Returns:
        A PIL image in mode ``"RGB"``, fully decoded (independent of the file).

    Raises:
        BadImageError: (a ``ValueError``) the file is missing, empty, over ``max_bytes``, claims
            more than ``max_pixels`` pixels, is truncated or corrupted, or is not an image. The
            message starts with the path.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadImageError(f"{path}: cannot read file ({e.strerror or e})") from e
    if size == 0:
        raise BadImageError(f"{path}: empty file (0 bytes)")
    if max_bytes is not None and size > max_bytes:
        raise BadImageError(f"{path}: file has {size} bytes, over the limit of {max_bytes} (max_bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns in open() above Image.MAX_IMAGE_PIXELS; our own limit below decides,
            # and the process-wide setting stays as the user left it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if max_pixels is not None and width * height > max_pixels:
                    raise BadImageError(
                        f"{path}: header claims {width}x{height} = {width * height} pixels, over the limit of "
                        f"{max_pixels} (max_pixels; possible decompression bomb); not decoded"
                    )
                if draft_size is not None:
                    opened.draft("RGB", (draft_size, draft_size))  # a no-op except for JPEG
                opened.load()  # decode now, so truncation shows up here and not in a transform
                try:
                    im = ImageOps.exif_transpose(opened)
                except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels, skip the rotation
                    im = opened
                rgb = to_rgb(im, background)
                # Closing the file invalidates `opened`; return pixels that do not depend on it.
                return rgb.copy() if rgb is opened else rgb
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(f"{path}: refused by PIL as a possible decompression bomb ({e}); not decoded") from e
    except Exception as e:  # noqa: BLE001 - decoders of hostile files raise anything (struct.error, SyntaxError...)
        reason = "truncated file" if "truncated" in str(e) else "cannot decode"
        raise BadImageError(f"{path}: {reason} ({type(e).__name__}: {e})") from e


def find_bad_images(
    paths: Iterable[str | Path],
    *,
    max_pixels: int | None = MAX_PIXELS,
    max_bytes: int | None = MAX_BYTES,
) -> list[BadImage]:
    """Decode every file with `load_image` and list those that fail, in input order.

    Costs one full decode per file (about the time of one epoch's image loading); runs in the
    calling thread because ``warnings.catch_warnings`` is not thread-safe.
    """
    bad = []
    for p in paths:
        try:
            load_image(p, max_pixels=max_pixels, max_bytes=max_bytes)
        except BadImageError as e:
            prefix = f"{p}: "
            msg = str(e)
            bad.append(BadImage(Path(p), msg[len(prefix):] if msg.startswith(prefix) else msg))
    return bad


def expand_image_paths(patterns: Iterable[str | Path]) -> list[Path]:
    """Files named by paths, folders (every image inside, recursively, sorted) or globs, in order, deduplicated.

    A path that names no existing file is kept as it is: reading it reports the problem, with
    the file's name, in the same place as any other unreadable file.

    Raises:
        FileNotFoundError: a glob that matches nothing, or a folder with no image file
            (`IMAGE_EXTENSIONS`); the message names it.
    """
    import glob

    out: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        if Path(text).is_dir():
            found = sorted(p for p in Path(text).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"{text}: folder holds no image (suffixes {sorted(IMAGE_EXTENSIONS)})")
            out += found
        elif not Path(text).exists() and glob.has_magic(text):  # an existing "a[1].jpg" is a file, not a glob
            hits = sorted(glob.glob(text, recursive=True))
            if not hits:
                raise FileNotFoundError(f"{text}: no file matches")
            out += [Path(h) for h in hits if Path(h).is_file()]
        else:
            out.append(Path(text))
    return list(dict.fromkeys(out))
