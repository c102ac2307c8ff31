"""Property tests: hostile bytes and random configs end in a clean error, never a crash."""

import base64
import io
import math
import zlib

import pytest
import yaml
from conftest import SAMPLE
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from tlkit import (
    AugmentConfig,
    BackboneConfig,
    BadImageError,
    DatasetConfig,
    FreezePolicy,
    HeadConfig,
    RunConfig,
    TrainConfig,
    load_image,
)
from tlkit.images import find_bad_images

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
    for suffix in (".yaml", ".json"):  # written with absolute paths, so read back the same from any folder
        assert RunConfig.from_file(config.to_file(folder / f"run{suffix}")) == config.with_paths(lambda p: p.absolute())


# -- config files and --set values as an adversary writes them (issue 13) --------------------
# Each: file name, content, and what the error must name (a field, or the line of a syntax error).
# Before the fix, 11 of 49 such files ended in a traceback (YAML errors and tags, device: banana,
# a 100000 x 100000 input that ran out of memory in the first epoch) and 6 failed only after
# `tlkit train` had written the run folder.
NASTY_FILES = [
    ("flow.yaml", "train: [epochs: 3\n", "line 2, column 1"),
    ("tab.yaml", "train:\n\tepochs: 3\n", "line 2, column 1"),
    ("brace.yaml", "train: {lr: 0.1\n", "line 2, column 1"),
    ("quote.yaml", "train:\n  device: 'cpu\n", "line 3, column 1"),
    ("indent.yaml", "train:\n  epochs: 3\n epochs: 4\n", "line 3, column 2"),
    ("python-object.yaml", "!!python/object/apply:os.system ['echo hacked']\n", "line 1, column 1"),
    ("python-name.yaml", "train:\n  device: !!python/name:os.system\n", "line 2, column 11"),
    ("custom-tag.yaml", "train: !custom 3\n", "line 1, column 8"),
    ("binary.yaml", "train:\n  device: !!binary aGVsbG8=\n", "line 2, column 11"),
    ("date.yaml", "train:\n  seed: 2024-01-01\n", "line 2, column 9"),
    ("set.yaml", "!!set {a, b}\n", "line 1, column 1"),
    ("utf16.yaml", "train:\n  epochs: 3\n".encode("utf-16"), "line 1, column 1"),
    ("latin1.yaml", b"train:\n  device: caf\xe9\n", "line 2, column 14"),
    ("nul.yaml", b"train:\n  device: c\x00pu\n", "line 2, column 12"),
    ("escape.yaml", b"train:\n  device: \x1b[2J\n", "line 2, column 11"),
    ("loop.yaml", "a: &a [*a]\n", "line 1, column 4"),
    ("laughs.yaml", "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(6)), "line 6"),
    ("deep.yaml", "[" * 200 + "]" * 200, "nested deeper than 32 levels"),
    ("two-docs.yaml", "train: {}\n---\nhead: {}\n", "line 2, column 1"),
    ("repeat.yaml", "train:\n  epochs: 3\n  epochs: 300\n", "line 3, column 3: key 'epochs' repeats"),
    ("unhashable.yaml", "? [1, 2]\n: 3\n", "line 1, column 3"),
    ("list.yaml", "- train\n- head\n", "mapping at the top level"),
    ("syntax.json", '{"train": {"epochs": 3,}}', "line 1, column 24"),
    ("repeat.json", '{"train": {"epochs": 3, "epochs": 300}}', "key 'epochs' repeats"),
    ("nan.json", '{"train": {"lr": NaN}}', "train.lr"),
    ("banana.yaml", "train:\n  device: banana\n", "train.device"),
    ("cuda-x.yaml", "train:\n  device: 'cuda:x'\n", "train.device"),
    ("huge-input.yaml", "backbone:\n  data_config:\n    input_size: [3, 100000, 100000]\n",
     "backbone.data_config.input_size"),
    ("zero-input.yaml", "backbone:\n  data_config:\n    input_size: [3, 0, 0]\n", "backbone.data_config.input_size"),
    ("tiny-crop.yaml", "backbone:\n  data_config:\n    crop_pct: 1.0e-300\n", "backbone.data_config.crop_pct"),
    ("tiny-std.yaml", "backbone:\n  data_config:\n    std: [1.0e-310, 0.5, 0.5]\n", "backbone.data_config.std"),
    ("epochs-1e23.yaml", "train:\n  epochs: 1e23\n", "train.epochs"),
    ("epochs-float.yaml", "train:\n  epochs: 1.0e+23\n", "train.epochs"),
    ("epochs-half.yaml", "train:\n  epochs: 2.5\n", "train.epochs"),
    ("epochs-true.yaml", "train:\n  epochs: true\n", "train.epochs"),
    ("epochs-many.yaml", "train:\n  epochs: 100000\n", "train.epochs"),
    ("seed-negative.yaml", "train:\n  seed: -1\n", "train.seed"),
    ("seed-2-40.yaml", f"train:\n  seed: {2**40}\n", "train.seed"),
    ("seed-2-32.yaml", f"train:\n  seed: {2**32}\n", "train.seed"),
    ("split-seed.yaml", f"data:\n  split_seed: {2**40}\n", "data.split_seed"),
    ("lr-nan.yaml", "train:\n  lr: .nan\n", "train.lr"),
    ("wd-inf.yaml", "train:\n  weight_decay: .inf\n", "train.weight_decay"),
    ("batch-zero.yaml", "train:\n  batch_size: 0\n", "train.batch_size"),
    ("batch-huge.yaml", "train:\n  batch_size: 1000000000\n", "train.batch_size"),
    ("workers.yaml", "train:\n  num_workers: 10000\n", "train.num_workers"),
    ("hidden.yaml", "head:\n  hidden_dim: 1000000000\n", "head.hidden_dim"),
    ("randaugment.yaml", "data:\n  augment:\n    auto_augment: rand-n100000\n", "data.augment.auto_augment"),
    ("kwargs-nan.yaml", "backbone:\n  model_kwargs:\n    drop_rate: .nan\n", "backbone.model_kwargs"),
    ("nul-path.yaml", 'output_dir: "runs/a\\0b"\n', "output_dir"),
    ("section.yaml", "train: 5\n", "train"),
    ("unknown.yaml", "train:\n  epochz: 3\n", "train.epochz"),
]


def _write(folder, name, content):
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _assert_clean(error, path, named):
    """A ConfigError starting with the file, or a ValidationError, that names ``named``."""
    from tlkit.config import ConfigError

    if isinstance(error, ValidationError):
        fields = [".".join(str(x) for x in e["loc"]) for e in error.errors()]
        assert any(named in f or named in e["msg"] for f, e in zip(fields, error.errors())), (named, fields)
    else:
        assert isinstance(error, ConfigError), repr(error)
        assert str(error).startswith(f"{path}: ") and named in str(error) and "\n" not in str(error), error


@pytest.mark.parametrize("name,content,named", NASTY_FILES, ids=[c[0] for c in NASTY_FILES])
def test_nasty_config_files_are_one_clean_error(tmp_path, name, content, named):
    path = _write(tmp_path, name, content)
    with pytest.raises(ValueError) as info:  # ConfigError and ValidationError are ValueErrors
        RunConfig.from_file(path)
    _assert_clean(info.value, path, named)


@pytest.mark.parametrize("name,content,named", NASTY_FILES, ids=[c[0] for c in NASTY_FILES])
def test_tlkit_train_refuses_nasty_files_before_the_run_folder_exists(tmp_path, capsys, name, content, named):
    from tlkit.cli import main

    path, run = _write(tmp_path, name, content), tmp_path / "run"
    assert main(["train", "--config", str(path), "--set", f"output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tlkit train: error: ") and err.count("\n") == 1 and named in err, err
    assert not any(c in err for c in "\x00\x1b\x07")
    assert not run.exists()


def test_a_directory_named_like_a_config_is_a_clean_error(tmp_path):
    (tmp_path / "run.yaml").mkdir()
    with pytest.raises(ValueError) as info:
        RunConfig.from_file(tmp_path / "run.yaml")
    _assert_clean(info.value, tmp_path / "run.yaml", "is a directory")


# Random YAML: dumps of random config dicts, then mutated (syntax characters, tags, anchors).
YAML_JUNK = ["{", "}", "[", "]", ":", "- ", "? ", "&a ", "*a", "!!python/object:os.system ", "!x ", "'", '"',
             "\t", "\n", "  ", "#", "---\n", "<<: ", "%YAML 1.1\n", "\x1b", "\x00", "\ufeff", ".nan", "1e23", "0x1F"]


@st.composite
def yaml_texts(draw):
    raw = draw(random_configs)
    raw.pop("augment_in_data", None)
    text = yaml.safe_dump(raw, allow_unicode=True)
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.sampled_from(YAML_JUNK) | st.text(max_size=3)) + text[i + draw(st.integers(0, 3)):]
    return text


@FAST
@given(text=yaml_texts(), suffix=st.sampled_from([".yaml", ".json"]))
@example(text="train:\n  device: banana\n", suffix=".yaml")
@example(text="a: &a [*a, *a]\nb: [*a, *a]\n", suffix=".yaml")
def test_random_yaml_texts_read_or_fail_cleanly(folder, text, suffix):
    from tlkit.config import ConfigError

    path = folder / f"random{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        RunConfig.from_file(path)
    except ValidationError as e:
        assert e.errors()
    except ConfigError as e:
        assert str(e).startswith(f"{path}: "), e


# The `tlkit train` checks that run before anything is written, on random --set overrides.
KEYS = [f"{section}.{field}" for section, model in SECTIONS.items() for field in model.model_fields] + [
    "output_dir", "backbone.data_config.input_size", "data.augment.auto_augment", "train.nope", "nope.x"]
set_values = st.sampled_from(YAML_JUNK + ["banana", "-1", "0", "4294967296", "[3, 100000, 100000]", "true", "null",
                                          "cuda:7", "mps", "1.5", "{a: 1}", "rand-n1000"]) | st.text(max_size=8)


@FAST
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), set_values), max_size=4))
@example(overrides=[("train.device", "banana")])
@example(overrides=[("backbone.data_config.input_size", "[3, 100000, 100000]")])
@example(overrides=[("train.seed", "-1"), ("train.epochs", "1e23")])
def test_train_checks_random_overrides_before_writing(folder, overrides):
    from tlkit.cli import build_parser
    from tlkit.cli._train import _train_inputs

    run = folder / "cli-run"
    sets = [f"{k}={v}" for k, v in overrides]
    base = ["--set", "backbone.name=test_resnet", "--set", "backbone.pretrained=false", "--set", f"data.root={SAMPLE}"]
    args = build_parser().parse_args(["train", *base, *(a for s in sets for a in ("--set", s)), "--set",
                                      f"output_dir={run}"])
    try:
        config, train, _ = _train_inputs(args)  # everything tlkit train checks before it builds a model
    except (ValueError, FileNotFoundError) as e:  # ValidationError and ConfigError are ValueErrors
        assert str(e)
    else:
        assert config.output_dir == run and train.classes
    assert not run.exists()
