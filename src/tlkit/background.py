"""Background swap: objects photographed on a plain background, pasted onto varied generated ones.

A model trained on photos of one object on white posterboard (TrashNet) learns the posterboard
too: on real photos (floors, tables, asphalt, bags) it is right far less often. `BackgroundSwap`
is a training augmentation that breaks that shortcut: it cuts the object out of its plain
background (`object_mask`) and pastes it, rotated and rescaled, onto a background drawn by
`random_background`, under a random light. It is the "copy-paste" augmentation of Ghiasi et al.
(CVPR 2021) with backgrounds generated rather than taken from other photos, so that no photo
of the kind the model is judged on is needed.

**Segmentation** (`object_mask`), for photos whose background is plain and light, documented so
that its failures are understood: the background colour is the median of a strip along the
image border (plain when it is light and pale, brightness at least 140 of 255 and channels within
60 of each other, and 60% of the strip lies within 40 of it); a pixel's distance from it (the largest of its RGB differences, plus its
saturation) is thresholded at Otsu's threshold of the distance histogram (at least 24 of 255);
the mask is closed then opened (3 x 3 max/min filters), holes are filled (everything not
reachable from the border through background), and its edge is feathered (Gaussian blur,
radius 1.5 px). Transparent glass and white paper on white are found only in part: the pasted
object then carries some of its own background with it, which the random light and the
background's texture hide in part. A photo is used as it is when its border is dark or uneven
(the object fills the frame: no plain background to swap), or the mask is implausible: under 4%
or over 90% of the image, a box under 10% of the frame, or under 30% of its box filled (scattered
pieces, such as the label and cap of a clear bottle).

**Backgrounds** (`random_background`): multi-scale value noise (stone, asphalt, carpet, soil),
speckle, wood-like grain and tiles, in colours drawn from greys, beiges, browns and dull
colours, with a light gradient; all generated from a seeded `numpy` generator.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["BackgroundSwap", "object_mask", "random_background"]

_MASK_SIDE = 256  # the mask is computed at this longer side, then resized
_WORK_SIDE = 320  # a swapped photo is composed at this longer side (training crops to ~224 anyway)
_MIN_THRESHOLD = 24
# A plain background: the border's median colour this light, and this share of the border near it.
_PLAIN_MIN_BRIGHTNESS, _PLAIN_MAX_TINT, _PLAIN_NEAR, _PLAIN_MIN_SHARE = 140, 60, 40, 0.6
_MIN_BOX, _MIN_FILL = 0.10, 0.30  # the object's box: at least this share of the frame, filled at least this much
_MIN_SHARE, _MAX_SHARE = 0.04, 0.90


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 ``values`` (the split that maximises the between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 - total * m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0
    return float(np.argmax(between))


def _fill_holes(mask: Image.Image) -> Image.Image:
    """``mask`` (mode "L", 0/255) with every region not reachable from the border through 0 set to 255."""
    w, h = mask.size
    padded = Image.new("L", (w + 2, h + 2), 0)
    padded.paste(mask, (1, 1))
    ImageDraw.floodfill(padded, (0, 0), 128)  # the background reachable from outside
    outside = np.asarray(padded)[1:-1, 1:-1] == 128
    return Image.fromarray(np.where(outside, 0, 255).astype(np.uint8))


def object_mask(image: Image.Image) -> Image.Image | None:
    """The object of a photo on a plain, light background, as a mode "L" mask (255 = object).

    See the module docstring for the method. Returns a mask of the image's size, or ``None``
    when the photo has no plain, light background (its border is dark or uneven: the object
    fills the frame) or no plausible object is found (under 4% or over 90% of the image).
    """
    rgb = image.convert("RGB")
    scale = _MASK_SIDE / max(rgb.size)
    small = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR)
    a = np.asarray(small, dtype=np.int16)
    b = max(2, round(0.04 * min(a.shape[:2])))
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3),
                             a[:, -b:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    near = (np.abs(border - background).max(axis=1) <= _PLAIN_NEAR).mean()
    if background.mean() < _PLAIN_MIN_BRIGHTNESS or np.ptp(background) > _PLAIN_MAX_TINT or near < _PLAIN_MIN_SHARE:
        return None  # the object fills the frame, or the background is not plain, light and pale
    diff = np.abs(a - background).max(axis=2)
    saturation = a.max(axis=2) - a.min(axis=2)
    distance = np.clip(diff + saturation // 2, 0, 255).astype(np.uint8)
    threshold = max(_otsu(distance), _MIN_THRESHOLD)
    mask = Image.fromarray(np.where(distance > threshold, 255, 0).astype(np.uint8))
    mask = mask.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.MinFilter(3))  # close
    mask = mask.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))  # open
    mask = _fill_holes(mask)
    m = np.asarray(mask) > 127
    share = m.mean()
    box = mask.getbbox()
    box_share = ((box[2] - box[0]) * (box[3] - box[1]) / m.size) if box else 0.0
    # A few scattered pieces (the label and cap of a clear bottle, the print on white paper) are
    # not the object: a mask must fill a fair part of its box and its box a fair part of the frame.
    if not _MIN_SHARE <= share <= _MAX_SHARE or box_share < _MIN_BOX or share < _MIN_FILL * box_share:
        return None
    return mask.resize(rgb.size, Image.BILINEAR).filter(ImageFilter.GaussianBlur(1.5))


_PALETTE = np.array([
    (128, 128, 128), (90, 90, 92), (170, 168, 160), (60, 60, 62), (200, 196, 186),  # greys: stone, asphalt, tiles
    (150, 120, 90), (110, 80, 55), (190, 160, 120), (80, 60, 45), (210, 190, 150),   # browns and beiges: wood, soil
    (70, 90, 70), (60, 70, 100), (120, 60, 50), (40, 40, 40), (225, 220, 210),       # dull colours, dark, pale
], dtype=np.float64)


def _noise(h: int, w: int, rng: np.random.Generator, octaves: int = 4) -> np.ndarray:
    """Fractal value noise in [0, 1], shape (h, w): octaves of bilinearly upsampled random grids."""
    out = np.zeros((h, w))
    amplitude, total = 1.0, 0.0
    cells = int(rng.integers(2, 6))
    for _ in range(octaves):
        grid = rng.random((cells + 1, cells + 1))
        layer = np.asarray(Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float64)
        out += amplitude * layer / 255
        total += amplitude
        amplitude *= float(rng.uniform(0.4, 0.7))
        cells *= 2
    return out / total


def random_background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A generated background of ``size`` (width, height), RGB: textured floor, table or ground.

    Args:
        size: ``(width, height)`` in pixels.
        rng: the generator every choice is drawn from (seeded by the caller for repeatability).
    """
    w, h = size
    base = _PALETTE[rng.integers(len(_PALETTE))] + rng.normal(0, 12, 3)
    kind = rng.choice(["noise", "speckle", "grain", "tiles", "plain"], p=[0.35, 0.25, 0.15, 0.15, 0.10])
    shade = np.zeros((h, w))
    if kind in ("noise", "speckle"):
        shade = (_noise(h, w, rng) - 0.5) * rng.uniform(20, 90)
    if kind == "speckle":
        dots = rng.random((h, w)) < rng.uniform(0.01, 0.08)
        shade = shade + dots * rng.choice([-1, 1]) * rng.uniform(30, 90)
    elif kind == "grain":
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        warp = _noise(h, w, rng, octaves=2) * rng.uniform(5, 25)
        angle = rng.uniform(0, math.pi)
        shade = np.sin((x * math.cos(angle) + y * math.sin(angle)) / rng.uniform(2, 8) + warp) * rng.uniform(8, 30)
    elif kind == "tiles":
        step = int(rng.integers(max(8, min(w, h) // 8), max(9, min(w, h) // 2)))
        y, x = np.mgrid[0:h, 0:w]
        grout = ((x % step) < 2) | ((y % step) < 2)
        shade = (_noise(h, w, rng, octaves=3) - 0.5) * 30 - grout * rng.uniform(20, 60)
    # A light gradient across the frame (a lamp, a window).
    gy, gx = np.mgrid[0:h, 0:w] / max(h, w)
    light = (gx * rng.uniform(-1, 1) + gy * rng.uniform(-1, 1)) * rng.uniform(10, 50)
    pixels = base[None, None, :] + (shade + light)[..., None] * rng.uniform(0.8, 1.2, 3)[None, None, :]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


class BackgroundSwap:
    """With probability ``p``, put the photo's object onto a generated background (a PIL transform).

    The object (`object_mask`) is rotated by a random angle, scaled so that its box covers a
    random ``scale`` fraction of the shorter side, placed at a random position, given a soft
    shadow, and the whole frame a random brightness and contrast. The output has the input's
    size, or its size reduced to 320 pixels on the longer side when swapped (training crops and
    resizes it anyway), mode RGB. Seeded from Python's ``random`` (which tlkit's loaders seed per worker and
    epoch), so runs repeat.

    Args:
        p: probability of swapping a photo's background.
        scale: range of the object's size, as a fraction of the output's shorter side.
    """

    def __init__(self, p: float = 0.8, scale: tuple[float, float] = (0.45, 0.95)) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p, self.scale = p, scale

    def __repr__(self) -> str:
        return f"BackgroundSwap(p={self.p}, scale={self.scale})"

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.p <= 0 or random.random() >= self.p:
            return image
        rng = np.random.default_rng(random.getrandbits(64))
        image = image.convert("RGB")
        if max(image.size) > _WORK_SIDE:
            factor = _WORK_SIDE / max(image.size)
            image = image.resize((round(image.width * factor), round(image.height * factor)), Image.BILINEAR)
        mask = object_mask(image)
        box = mask.point(lambda v: 255 if v > 127 else 0).getbbox() if mask is not None else None
        if box is None:
            return image
        obj, alpha = image.crop(box), mask.crop(box)
        angle = float(rng.uniform(0, 360))
        obj = obj.rotate(angle, resample=Image.BILINEAR, expand=True)
        alpha = alpha.rotate(angle, resample=Image.BILINEAR, expand=True)
        out = random_background(image.size, rng)
        side = min(image.size) * float(rng.uniform(*self.scale))
        factor = side / max(obj.size)
        size = (max(1, round(obj.width * factor)), max(1, round(obj.height * factor)))
        obj, alpha = obj.resize(size, Image.BILINEAR), alpha.resize(size, Image.BILINEAR)
        x = int(rng.integers(0, max(1, image.width - size[0] + 1)))
        y = int(rng.integers(0, max(1, image.height - size[1] + 1)))
        shadow = alpha.filter(ImageFilter.GaussianBlur(max(1.0, side / 40))).point(lambda v: int(v * 0.45))
        dx, dy = (int(v) for v in rng.integers(-max(1, round(side / 30)), max(2, round(side / 30)) + 1, 2))
        out.paste(Image.new("RGB", size, (0, 0, 0)), (x + dx, y + dy), shadow)
        out.paste(obj, (x, y), alpha)
        a = np.asarray(out, dtype=np.float64)
        a = (a - 128) * float(rng.uniform(0.8, 1.2)) + 128 + float(rng.uniform(-25, 25))
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
