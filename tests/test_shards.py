"""Sharded tar streams (issue 28): written from a folder or a table, read exactly once per epoch
across ranks and workers, trained on by FineTuner.fit."""

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import copy_sample, tiny_tuner

from tlkit import ImageFolderDataset
from tlkit.shards import ShardDataset, write_shards

CLASSES = ["cardboard", "glass", "metal"]
HERE = Path(__file__).resolve().parent


@pytest.fixture
def shards(tmp_path):
    data = ImageFolderDataset(copy_sample(tmp_path / "data", CLASSES, 8))  # 24 photos
    write_shards(data, tmp_path / "shards", samples_per_shard=3)  # 8 shards
    return data, tmp_path / "shards"


def _digest(path):
    from tlkit import load_image

    return hashlib.sha256(load_image(path).tobytes()).hexdigest()


def test_shards_hold_every_sample_once_in_the_webdataset_layout(shards):
    data, folder = shards
    index = json.loads((folder / "shards.json").read_text())
    assert index["classes"] == CLASSES and [s["samples"] for s in index["shards"]] == [3] * 8
    names = tarfile.open(folder / "shard-000000.tar").getnames()
    assert len(names) == 6 and {Path(n).suffix for n in names} == {".jpg", ".cls"}
    ds = ShardDataset(folder, transform=lambda im: hashlib.sha256(im.tobytes()).hexdigest(), shuffle=False)
    got = [(d, y) for d, y in ds]
    assert sorted(got) == sorted((_digest(p), y) for p, y in data.samples)
    with pytest.raises(ValueError, match="already holds shards"):
        write_shards(data, folder)


@pytest.mark.parametrize("epoch", [0, 1])
def test_two_ranks_times_two_workers_read_every_sample_exactly_once(shards, tmp_path, epoch):
    data, folder = shards
    out = tmp_path / f"seen{epoch}"
    out.mkdir()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "shard_worker.py"), str(folder), str(out), str(epoch)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    assert sorted(seen) == sorted(_digest(p) for p, _ in data.samples)  # every sample, none twice
    assert [r["len"] for r in ranks] == [len(r["seen"]) for r in ranks] == [12, 12]


def test_the_shuffle_changes_with_the_epoch_and_repeats_with_the_seed(shards):
    _, folder = shards
    a = ShardDataset(folder, rank=0, world_size=1)
    orders = []
    for epoch in (0, 1, 0):
        a.set_epoch(epoch)
        orders.append(a.my_shards())
    assert orders[0] == orders[2] != orders[1] and sorted(orders[0]) == list(range(8))


def test_fit_trains_and_evaluates_from_shards(shards):
    data, folder = shards
    tuner = tiny_tuner(CLASSES, epochs=2, batch_size=4)
    history = tuner.fit(ShardDataset(folder), ShardDataset(folder, shuffle=False))
    assert len(history) == 2 and tuner.step == 2 * 6
    assert history[-1]["confusion_matrix"] and sum(map(sum, history[-1]["confusion_matrix"])) == 24
    assert tuner.evaluate(ShardDataset(folder, shuffle=False)).n == 24


def test_cli_writes_shards_from_a_folder(tmp_path, capsys):
    from tlkit.cli import main

    root = copy_sample(tmp_path / "data", CLASSES, 4)
    assert main(["shards", "--data", str(root), "--output", str(tmp_path / "s"), "--samples-per-shard", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"shards": 3, "samples": 12, "folder": str(tmp_path / "s")}
    assert len(list(ShardDataset(tmp_path / "s", shuffle=False))) == 12
