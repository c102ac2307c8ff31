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
    for suffix in (".yaml", ".json"):
        assert RunConfig.from_file(cfg.to_file(tmp_path / f"run{suffix}")) == cfg


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
