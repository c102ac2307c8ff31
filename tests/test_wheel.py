"""The built wheel installs into a fresh virtual environment and runs there."""

import os
import subprocess
import sysconfig
import sys
import textwrap
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")
def test_wheel_installs_and_runs_the_quickstart(tmp_path):
    pytest.importorskip("setuptools")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-w", str(dist), "-q"], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("tlkit-*.whl")
    import zipfile

    assert "tlkit/py.typed" in zipfile.ZipFile(wheel).namelist()  # PEP 561 marker ships
    # torch, timm & co. come from this environment's site-packages (a .pth line: the folder is
    # appended to sys.path but its own .pth files, the editable tlkit among them, are not run);
    # tlkit itself only from the wheel.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    child = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           check=True, capture_output=True, text=True).stdout.strip()
    Path(child, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what a user's shell has
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, env=env)
    script = textwrap.dedent(f"""
        import pathlib, sys, timm, torch
        import tlkit
        from tlkit import FineTuner, FreezePolicy, HeadReplacer, ImageFolderDataset, TrainConfig, stratified_split
        assert pathlib.Path(tlkit.__file__).is_relative_to(pathlib.Path(sys.prefix)), tlkit.__file__
        train, val = stratified_split(ImageFolderDataset({str(REPO / "examples/garbage/data")!r}), 0.2, 0)
        model = HeadReplacer(len(train.classes)).apply(timm.create_model("test_resnet"))
        tuner = FineTuner(model, train.classes, policy=FreezePolicy.linear_probe(),
                          config=TrainConfig(epochs=1, batch_size=16, progress=False),
                          data_config={{"input_size": [3, 64, 64], "interpolation": "bilinear", "mean": [0.5] * 3,
                                        "std": [0.5] * 3, "crop_pct": 0.875, "crop_mode": "center"}})
        tuner.fit(train, val)
        print("ok", tuner.predict(val.samples[0][0])[0].label in train.classes)
    """)
    out = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok True"
    cli = subprocess.run([str(env_dir / "bin" / "tlkit"), "--help"], check=True, capture_output=True, text=True, env=env)
    assert "export" in cli.stdout and "predict" in cli.stdout
