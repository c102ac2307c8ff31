"""bench/bench_peers.py: the check of a peer's tool, shared with bench_datasets.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_peers  # noqa: E402


def test_each_peer_row_names_the_option_it_needs_and_others_need_none(tmp_path):
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "train.py").write_text("")
    for row in ("timm", "timm-lite0"):
        assert bench_peers.missing_tool(row, None) == "--timm-repo (a checkout of pytorch-image-models)"
        assert bench_peers.missing_tool(row, tmp_path) is not None  # a folder without train.py
        assert bench_peers.missing_tool(row, tmp_path / "timm") is None
    assert bench_peers.missing_tool("autogluon", None, tmp_path / "no-python").startswith("--autogluon-python (")
    assert bench_peers.missing_tool("autogluon", None, tmp_path / "timm" / "train.py") is None  # a file that exists
    assert bench_peers.missing_tool("fastai", None) is None


def test_the_timm_row_without_a_checkout_is_skipped_in_one_line_and_trains_nothing(tmp_path, capsys):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "data" / c / f"{i}.png")
    bench_peers.main(["--data", str(tmp_path / "data"), "--rows", "timm-lite0", "--out", str(tmp_path / "out")])
    assert "timm-lite0: skipped (give --timm-repo (a checkout of pytorch-image-models))" in capsys.readouterr().out
    assert not (tmp_path / "out" / "rows").exists()
