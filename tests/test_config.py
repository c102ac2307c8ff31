import pytest
from pydantic import ValidationError

from tlkit import FreezePolicy, RunConfig, TrainConfig


def test_yaml_and_json_roundtrip(tmp_path):
    cfg = RunConfig.model_validate({
        "backbone": {"name": "mobilenetv2_100", "weights": "w.safetensors", "model_kwargs": {"pad_type": "same"},
                     "data_config": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}},
        "head": {"dropout": 0.2},
        "freeze": FreezePolicy.linear_probe(batchnorm="frozen").then(2, depth=-4).model_dump(),
        "train": {"epochs": 5, "lr": 0.002},
        "data": {"root": "photos", "val_fraction": 0.25},
    })
    for suffix in (".yaml", ".json"):  # a written config holds absolute paths: it reads the same anywhere
        assert RunConfig.from_file(cfg.to_file(tmp_path / f"run{suffix}")) == cfg.with_paths(lambda p: p.absolute())


def test_relative_paths_in_a_config_file_are_relative_to_its_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "configs" / "run.yaml"
    path.write_text("backbone:\n  weights: ../w/m.safetensors\ndata:\n  root: photos\n  val_root: /abs/val\n"
                    "output_dir: runs/a\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = RunConfig.from_file(path)
    assert cfg.data.root == tmp_path / "configs" / "photos"
    assert cfg.backbone.weights == tmp_path / "configs" / ".." / "w" / "m.safetensors"
    assert str(cfg.data.val_root) == "/abs/val" and cfg.output_dir == tmp_path / "configs" / "runs" / "a"
    assert cfg.train.feature_cache_dir is None


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ValidationError, match="train.epochz"):
        RunConfig.from_file(path)


@pytest.mark.parametrize("field,value", [("lr", -1.0), ("epochs", 0), ("label_smoothing", 1.0), ("batch_size", 0)])
def test_out_of_range_values_are_named(field, value):
    with pytest.raises(ValidationError, match=field):
        TrainConfig(**{field: value})


def test_warmup_longer_than_training_is_rejected():
    with pytest.raises(ValidationError, match="warmup_epochs"):
        TrainConfig(epochs=2, warmup_epochs=3)


def test_reserved_timm_kwargs_are_rejected():
    with pytest.raises(ValidationError, match="num_classes"):
        RunConfig.model_validate({"backbone": {"model_kwargs": {"num_classes": 6}}})


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(Exception, match="python/object"):
        RunConfig.from_file(path)


def test_non_mapping_config_names_the_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yaml"):
        RunConfig.from_file(path)


@pytest.mark.parametrize("model,field", [(TrainConfig, "weight_decay"), (TrainConfig, "grad_clip_norm"),
                                         (FreezePolicy, "backbone_lr_scale")])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_nan_and_infinite_values_are_named(model, field, value):
    # ``ge=0`` / ``gt=0`` alone let inf through; it would surface later as a NaN loss
    with pytest.raises(ValidationError, match=field):
        model(**{field: value})


# -- bounds and file errors (issue 13: fuzzed configs must fail cleanly, naming the field) ------
@pytest.mark.parametrize("section,field,value", [
    ("train", "device", "banana"), ("train", "device", "cuda:x"), ("train", "device", "CPU"),
    ("train", "epochs", 1e23), ("train", "epochs", 2.0), ("train", "epochs", True), ("train", "epochs", 10_001),
    ("train", "seed", -1), ("train", "seed", 2**32), ("train", "seed", 2**40), ("data", "split_seed", 2**32),
    ("train", "batch_size", 0), ("train", "batch_size", 10**8), ("train", "eval_batch_size", 10**8),
    ("train", "num_workers", 10_000), ("train", "feature_views", 1000), ("train", "class_weights", [0.0, 0.0]),
    ("train", "class_weights", [1.0, -1.0]), ("head", "hidden_dim", 10**9), ("head", "num_classes", 10**9),
    ("data", "num_folds", 10**6), ("data", "classes", ["a", "a"]), ("data", "classes", ["a/b"]),
    ("data", "augment", {"auto_augment": "rand-n100000"}), ("data", "augment", {"auto_augment": "rand-x1"}),
    ("data", "augment", {"scale": [0.5, 2.0]}), ("backbone", "name", "resnet50\x1b[2J"),
    ("backbone", "model_kwargs", {"drop_rate": float("nan")}), ("backbone", "model_kwargs", {"x": {1, 2}}),
])
def test_out_of_bounds_values_are_named(section, field, value):
    with pytest.raises(ValidationError, match=rf"{section}\.{field}"):
        RunConfig.model_validate({section: {field: value}})


@pytest.mark.parametrize("overrides", [
    {"input_size": [3, 100000, 100000]}, {"input_size": [3, 224.5, 224]}, {"crop_pct": 1e-300},
    {"std": [1e-310, 0.5, 0.5]}, {"mean": [255.0, 0.5, 0.5]},
])
def test_data_config_sizes_and_scales_are_bounded(overrides):
    with pytest.raises(ValidationError, match=f"backbone.data_config.{next(iter(overrides))}"):
        RunConfig.model_validate({"backbone": {"data_config": overrides}})


def test_device_error_lists_the_accepted_forms():
    with pytest.raises(ValidationError, match=r"'auto', 'cpu', 'cuda', 'cuda:N'.*'mps'"):
        TrainConfig(device="banana")
    assert [TrainConfig(device=d).device for d in ("auto", "cpu", "cuda", "cuda:1", "mps")]


def test_limits_still_accept_real_runs():
    cfg = RunConfig.model_validate({
        "backbone": {"data_config": {"input_size": [3, 4096, 4096], "crop_pct": 0.5}},
        "train": {"epochs": 10_000, "seed": 2**32 - 1, "num_workers": 64, "batch_size": "64",
                  "class_weights": [0.0, 1.0]},
        "data": {"augment": {"auto_augment": "rand-m9-n2-mstd0.5-inc1"}},
    })
    assert cfg.train.seed == 2**32 - 1 and cfg.train.batch_size == 64


@pytest.mark.parametrize("name,content,where", [
    ("syntax.yaml", "train: [epochs: 3\n", "line 2, column 1"),
    ("tab.yaml", "train:\n\tepochs: 3\n", "line 2, column 1"),
    ("tag.yaml", "train: !foo 3\n", "line 1, column 8"),
    ("python.yaml", "train: !!python/object/apply:os.system ['echo hacked']\n", "line 1, column 8"),
    ("date.yaml", "train:\n  seed: 2024-01-01\n", "line 2, column 9"),
    ("repeat.yaml", "train:\n  epochs: 3\n  epochs: 30\n", "line 3, column 3"),
    ("control.yaml", "train:\n  device: \x1b[2J\n", "line 2, column 11"),
    ("latin1.yaml", b"train:\n  device: caf\xe9\n", "line 2, column 14"),
    ("syntax.json", '{"train": {"epochs": 3,}}', "line 1, column 24"),
    ("bomb.yaml", "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(6)), "line 6"),
    ("loop.yaml", "a: &a [*a]\n", "line 1, column 4"),
])
def test_unreadable_files_are_one_config_error_naming_file_and_line(tmp_path, name, content, where):
    from tlkit.config import ConfigError

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as info:
        RunConfig.from_file(path)
    assert str(info.value).startswith(f"{path}: {where}"), info.value
    assert "\n" not in str(info.value)


def test_a_directory_or_unknown_suffix_is_a_config_error(tmp_path):
    from tlkit.config import ConfigError

    (tmp_path / "run.yaml").mkdir()
    for path in (tmp_path / "run.yaml", tmp_path / "run.toml"):
        with pytest.raises(ConfigError, match=rf"^{path}: "):
            RunConfig.from_file(path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        RunConfig.from_file(tmp_path / "nope.yaml")


def test_bad_override_values_are_config_errors():
    from tlkit.config import ConfigError

    with pytest.raises(ConfigError, match=r"override 'train.epochs=\[': line 1"):
        RunConfig().with_overrides(["train.epochs=["])
    with pytest.raises(ConfigError, match="python/object"):
        RunConfig().with_overrides(["train.epochs=!!python/object:os.system x"])


def test_merge_keys_and_a_byte_order_mark_still_read(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xef\xbb\xbftrain:\n  <<: {epochs: 3, lr: 0.01}\n  seed: 1\n")
    cfg = RunConfig.from_file(path)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.seed) == (3, 0.01, 1)
