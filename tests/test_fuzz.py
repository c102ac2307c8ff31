"""Property tests: hostile bytes and random configs end in a clean error, never a crash."""

import base64
import io
import math
import zlib

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from conftest import SAMPLE
from tlkit import (
    AugmentConfig,
    BackboneConfig,
    BadImageError,
    DatasetConfig,
    FreezePolicy,
    HeadConfig,
    RunConfig,
    TrainConfig,
    find_bad_images,
    load_image,
)

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUFFIXES = [".jpg", ".png", ".gif", ".bmp", ".tif", ".webp", ".JPG"]
LIMIT = 1_000_000  # pixels: a mutated header may claim a large size; stay cheap


def _encoded(fmt: str, mode: str) -> bytes:
    buf = io.BytesIO()
    with Image.open(sorted((SAMPLE / "metal").iterdir())[0]) as im:
        im.convert(mode).resize((24, 16)).save(buf, fmt)
    return buf.getvalue()


SEEDS = {"jpeg": _encoded("JPEG", "RGB"), "png": _encoded("PNG", "RGBA"), "gif": _encoded("GIF", "P")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _check_clean(path):
    """load_image gives an RGB image or a BadImageError naming the file; the scan agrees."""
    try:
        image = load_image(path, max_pixels=LIMIT)
    except BadImageError as e:
        assert str(e).startswith(f"{path}: "), e
        bad = find_bad_images([path], max_pixels=LIMIT)
        assert [b.path for b in bad] == [path]
    else:
        assert image.mode == "RGB" and image.width * image.height <= LIMIT
        assert find_bad_images([path], max_pixels=LIMIT) == []


@FAST
@given(data=st.binary(max_size=2048), suffix=st.sampled_from(SUFFIXES))
@example(data=b"", suffix=".jpg")
@example(data=SEEDS["png"][:40], suffix=".png")
def test_random_bytes_never_crash_the_loader(folder, data, suffix):
    path = folder / f"random{suffix}"
    path.write_bytes(data)
    _check_clean(path)


@st.composite
def mutated(draw):
    kind = draw(st.sampled_from(sorted(SEEDS)))
    blob = bytearray(SEEDS[kind])
    for _ in range(draw(st.integers(0, 8))):  # flip bytes, header included
        i = draw(st.integers(0, len(blob) - 1))
        blob[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):  # insert junk
        i = draw(st.integers(0, len(blob)))
        blob[i:i] = draw(st.binary(min_size=1, max_size=64))
    if draw(st.booleans()):  # truncate
        blob = blob[: draw(st.integers(0, len(blob)))]
    return kind, bytes(blob)


@FAST
@given(case=mutated())
@example(case=("jpeg", SEEDS["jpeg"][: len(SEEDS["jpeg"]) * 6 // 10]))
def test_mutated_jpeg_png_gif_never_crash_the_loader(folder, case):
    kind, blob = case
    path = folder / f"mutated.{kind}"
    path.write_bytes(blob)
    _check_clean(path)


# Found by fuzzing Pillow 13 (zlib-compressed, base64): decoders raise more than OSError and
# ValueError on hostile files, e.g. SyntaxError from the PNG chunk reader on this one, and
# TypeError from TIFF on this one when it is read from memory.
DECODER_SURPRISES = {
    "syntax-error.png": (
        "eNrrDPBz5+WS4mJgYOD19HAJAtISQCwgACQYKu/bgCQkPF0cQyp2J6fUnXMQSlDy/bmiLZDX2ZOZ4d9fRq40meN7QGo9Xf1E"
        "1jklAACVXxO0"
    ),
    "type-error.tif": (
        "eNpNjc1O4lAYhls1E01c6EZdzBV4EbrQRJkoE2mhKkKLLQVKpVCLYkFsA4K1Fg0aNZlZcCejxrj0H3paRIxXMqcNC77kPefJ"
        "c94vx+OZRoYRBBlBEHQIQSFNwaA9HoMZQAdddlqDPXbyo4/H0VH3lmEm+nYne6zA42df3xlgwmm1mq9PT39pIi3wWwxNkeEQ"
        "gNJsNd9fHm931haXiABJJzOZBAX7AJjN9+fH603M5/P7CSKA44EoMIFlmc2353/plH+djkc5IRYhMB+AGvbfXq94YT0sqoqq"
        "ZHNJzA+cB/jBfZoLMlsHqrIvK5VDYdP1oGVeJZgQy6uGoVUr1WqRs1wPHlJ8sHhQrmn6oXZaP1M5R1umdcGxBJMvGXXdKOmG"
        "LrNu3brnU0GCTAhHl7W6fqFrOyEobWDXuEhwlRSkfGFfLSmV43LctmyrfcfmcudSlE5uS2kxlWSoENW223bnJFZsHO3lM1yM"
        "5+IRcg33ejofH91bNqs1lIIs70lCjMKXfi3Oz3Y/O5+VRP7PmVws7IrbskjhywtzMzNf3e+biFRuFLK7OV5c9m6EMWzlt5f6"
        "D2oW2Xk="
    ),
}


@pytest.mark.parametrize("name", sorted(DECODER_SURPRISES))
def test_decoder_errors_found_by_fuzzing_are_clean(folder, name):
    path = folder / name
    path.write_bytes(zlib.decompress(base64.b64decode(DECODER_SURPRISES[name])))
    with pytest.raises(BadImageError, match=rf"{name}: cannot decode \("):
        load_image(path)


SECTIONS = {
    "backbone": BackboneConfig, "head": HeadConfig, "freeze": FreezePolicy,
    "train": TrainConfig, "data": DatasetConfig,
}
scalars = (st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats()
           | st.text(st.characters(codec="utf-8"), max_size=12))
values = scalars | st.lists(scalars, max_size=4) | st.dictionaries(st.text(max_size=6), scalars, max_size=3)


def _section(model):
    keys = st.sampled_from([*model.model_fields, "unknown_key"])
    return st.dictionaries(keys, values, max_size=6)


random_configs = st.fixed_dictionaries(
    {}, optional={**{k: _section(m) for k, m in SECTIONS.items()},
                  "augment_in_data": _section(AugmentConfig), "output_dir": st.text(max_size=12)},
)


def _floats(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _floats(v)


@FAST
@given(raw=random_configs)
@example(raw={"train": {"weight_decay": math.inf}})
@example(raw={"freeze": {"backbone_lr_scale": math.inf}})
@example(raw={"data": {"augment": {"scale": [math.nan, 1.0]}}})
@example(raw={"train": {"lr": "0.1", "epochs": True}})
def test_random_config_dicts_validate_or_raise_a_validation_error(folder, raw):
    raw = dict(raw)
    if "augment_in_data" in raw:
        raw.setdefault("data", {})
        raw["data"] = {**raw["data"], "augment": raw.pop("augment_in_data")}
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError:
        return
    dumped = config.model_dump(mode="json")
    assert all(math.isfinite(x) for x in _floats(dumped)), dumped  # no NaN or inf gets in
    for suffix in (".yaml", ".json"):
        assert RunConfig.from_file(config.to_file(folder / f"run{suffix}")) == config
