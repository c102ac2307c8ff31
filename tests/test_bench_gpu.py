"""bench/bench_gpu.py's CPU-safe parts run (issue 28): the script a GPU machine runs is kept working."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_bench_smoke_run_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {(r["model"], r["source"], r["row"]) for r in result["rows"]}
    assert rows == {("test_resnet", s, r) for s in ("synthetic", "jpeg") for r in ("plain", "tlkit")}
    assert all(r["images_per_s"] > 0 for r in result["rows"])
