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
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DECODERS",
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

DECODERS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")
"""The only Pillow decoders tlkit lets open a file: those of `IMAGE_EXTENSIONS` (JPEG's also
opens MPO, the multi-picture JPEG some phones write). Pillow otherwise picks a decoder from the file's content,
whatever its name: a PostScript file named ``photo.jpg`` would start Ghostscript (Pillow's EPS
plugin runs ``gs``), and a dozen rarely used decoders (DDS, ICNS, ICO, IM, MSP, PCX, PPM, QOI,
SGI, SPIDER, TGA, XBM) would parse it."""

DECODE_BYTES_PER_PIXEL = 8
"""Decode memory allowed per pixel that ``max_pixels`` allows, in bytes (`load_image`): an RGB
JPEG needs about 6 (the decoded image and its RGB copy), so every 8-bit photo within
``max_pixels`` passes; a 16-bit or alpha image needs more per pixel (`_decode_bytes`) and is
refused at a correspondingly smaller size before it is decoded."""

SUMMARY_LINES = 10
"""Bad files listed by name in `ScanReport.summary` (the rest are counted)."""

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
# Peak bytes per pixel of decoding a mode and converting it with `to_rgb`: the decoded image,
# the intermediate arrays or images of the conversion, and the RGB result.
_PEAK_BYTES = {"1": 4, "L": 4, "P": 4, "RGB": 6, "YCbCr": 6, "LAB": 6, "HSV": 6, "CMYK": 7,
               "RGBA": 19, "RGBa": 19, "LA": 17, "La": 17, "PA": 17, "I": 16, "F": 7}


def _decode_bytes(mode: str, width: int, height: int, transparent: bool = False) -> int:
    """Peak memory, in bytes, of decoding a ``width`` x ``height`` image of ``mode`` to RGB
    (``transparent``: a palette or grey image with a transparent colour, composited like alpha)."""
    per_pixel = 14 if mode in _SIXTEEN_BIT else _PEAK_BYTES.get(mode, 19)  # 16-bit: 2 + float64 8 + 1 + 3
    return max(per_pixel, 17 if transparent else 0) * width * height


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

    def summary(self, limit: int = SUMMARY_LINES) -> str:
        """A human-readable report: a line per bad file (path and reason; the first ``limit``, then
        "and N more"), then the ignored files. File names and reasons come from a stranger's
        folder: control characters are escaped and each line is at most 300 characters."""
        from tlkit._text import escape_control

        def line(text: str) -> str:
            text = escape_control(text)
            return text if len(text) <= 300 else text[:297] + "..."

        lines = [line(f"scanned {self.checked} image files in {self.root}: {self.checked - len(self.bad)} usable, "
                      f"{len(self.bad)} bad")]
        lines += [line(f"  bad: {b.path}: {b.reason}") for b in self.bad[:limit]]
        if len(self.bad) > limit:
            lines.append(f"  ... and {len(self.bad) - limit} more bad files (ScanReport.bad lists them all)")
        if self.empty_classes:
            lines.append(line(f"  classes without usable images: {self.empty_classes[:limit]}"))
        if self.ignored:
            names = ", ".join(str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p)
                              for p in self.ignored[:10])
            more = f" and {len(self.ignored) - 10} more" if len(self.ignored) > 10 else ""
            lines.append(line(f"  ignored {len(self.ignored)} non-image file(s): {names}{more}"))
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


def _check_file_size(path: Path, max_bytes: int | None) -> None:
    """Raise `BadImageError` for a missing, empty or over-``max_bytes`` file, before it is opened."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadImageError(f"{path}: cannot read file ({e.strerror or e})") from e
    if size == 0:
        raise BadImageError(f"{path}: empty file (0 bytes)")
    if max_bytes is not None and size > max_bytes:
        raise BadImageError(f"{path}: file has {size} bytes, over the limit of {max_bytes} (max_bytes)")


def _check_header(opened: Image.Image, path: Path, max_pixels: int | None) -> None:
    """Raise `BadImageError` when the header's size or pixel format would need too much memory to decode."""
    if max_pixels is None:
        return
    width, height = opened.size
    if width * height > max_pixels:
        raise BadImageError(
            f"{path}: header claims {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (max_pixels; possible decompression bomb); not decoded"
        )
    need = _decode_bytes(opened.mode, width, height, "transparency" in opened.info)
    if need > DECODE_BYTES_PER_PIXEL * max_pixels:
        raise BadImageError(
            f"{path}: a {width}x{height} {opened.mode} image needs about {need / 2**20:.0f} MiB to decode, "
            f"over the limit of {DECODE_BYTES_PER_PIXEL * max_pixels / 2**20:.0f} MiB "
            f"({DECODE_BYTES_PER_PIXEL} bytes per pixel of max_pixels); not decoded")


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
            more than ``max_pixels`` pixels or would need more than `DECODE_BYTES_PER_PIXEL` x
            ``max_pixels`` bytes to decode (16-bit and alpha images need more per pixel), is
            truncated or corrupted, or is not one of the `DECODERS` formats (whatever its name).
            The message starts with the path.
    """
    path = Path(path)
    _check_file_size(path, max_bytes)
    try:
        with warnings.catch_warnings():
            # PIL warns in open() above Image.MAX_IMAGE_PIXELS; our own limit below decides,
            # and the process-wide setting stays as the user left it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=DECODERS) as opened:
                _check_header(opened, path, max_pixels)
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
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: cannot decode: not a {', '.join(DECODERS)} image (the formats tlkit "
                            "reads, whatever the file's name says)") from None
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
            found = [p for p in _walk_files(Path(text)) if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not found:
                raise FileNotFoundError(f"{text}: folder holds no image (suffixes {sorted(IMAGE_EXTENSIONS)})")
            out += found
        elif not Path(text).exists() and glob.has_magic(text):  # an existing "a[1].jpg" is a file, not a glob
            hits = _glob(text)
            if not hits:
                raise FileNotFoundError(f"{text}: no file matches")
            out += hits
        else:
            out.append(Path(text))
    return list(dict.fromkeys(out))


def _walk_files(root: Path) -> list[Path]:
    """Every file under ``root``, sorted; links to folders are not followed (a link loop ends)."""
    import os

    return sorted(Path(d) / f for d, _, files in os.walk(root, followlinks=False) for f in files)


def _glob(pattern: str) -> list[Path]:
    """The files matching ``pattern`` (``*``, ``?``, ``[...]`` within a name, ``**`` for any folders),
    sorted; found by walking from its fixed prefix without following links to folders, so a link
    loop under a ``**`` ends (Python's glob follows them)."""
    import re

    parts = Path(pattern).parts
    fixed = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    regex = "".join("(?:[^/]*/)*" if p == "**" else _segment(p) + "/" for p in parts[fixed:])
    matcher = re.compile(regex.removesuffix("/") + r"\Z")
    if not base.is_dir():
        return []
    return [p for p in _walk_files(base) if matcher.match(p.relative_to(base).as_posix())]


def _segment(part: str) -> str:
    """One path component of a glob as a regex that never crosses a ``/`` (fnmatch's rules)."""
    import re

    out, i = [], 0
    while i < len(part):
        c = part[i]
        close = part.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif close != -1:
            body = part[i + 1: close].replace("\\", "\\\\")
            out.append(f"[^/{body[1:]}]" if body.startswith("!") else f"[{body}]")
            i = close
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)
