"""`pip install tlkit` as users get it: the wheel and sdist build, install into a fresh virtual
environment without the source tree, and the README's commands run there offline (issue 23)."""

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The wheel and the sdist, built by `python -m build` from the repository (no network)."""
    import shutil

    pytest.importorskip("build")
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    # Built from a copy of what the sdist takes: setuptools' build/ and egg-info stay out of the repository.
    for name in ("pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist", "--outdir", str(out),
                    str(source)], check=True, capture_output=True, text=True, cwd=out)
    (wheel,) = out.glob("tlkit-*.whl")
    (sdist,) = out.glob("tlkit-*.tar.gz")
    return wheel, sdist


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory):
    """A fresh venv with tlkit from the wheel only; torch, timm & co. from this environment.

    The parent's site-packages is appended to sys.path with a .pth line (its own .pth files, the
    editable tlkit among them, are not run), so `import tlkit` can only find the wheel's copy.
    """
    wheel, _ = dist
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    child = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           check=True, capture_output=True, text=True).stdout.strip()
    Path(child, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # What a user's shell has: no PYTHONPATH into the source tree, and HF_HUB_OFFLINE unset (the
    # offline default must work without it).
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "HF_HUB_OFFLINE"}}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, env=env)
    return env_dir, env


@pytest.fixture
def user_folder(tmp_path):
    """A working folder like a user's checkout: `examples` (data and weights) beside, no `src`."""
    (tmp_path / "examples").symlink_to(REPO / "examples")
    return tmp_path


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")
def test_wheel_and_sdist_carry_the_package_and_its_metadata(dist):
    wheel, sdist = dist
    names = zipfile.ZipFile(wheel).namelist()
    assert "tlkit/py.typed" in names and "tlkit/pretrained.py" in names  # PEP 561 marker ships
    assert not [n for n in names if n.startswith(("tests/", "examples/", "bench/"))]
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta and "Requires-Python: >=3.10" in meta
    assert "Classifier: Development Status :: 3 - Alpha" in meta and "Classifier: Typing :: Typed" in meta
    assert "Requires-Dist: timm>=1.0.26" in meta and "Project-URL" not in meta  # no public home yet: none invented
    members = tarfile.open(sdist).getnames()
    root = members[0].split("/")[0]
    for must in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "src/tlkit/__init__.py"):
        assert f"{root}/{must}" in members, must


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")
def test_the_readme_python_route_runs_offline_from_the_wheel(installed, user_folder):
    env_dir, env = installed
    readme = (REPO / "README.md").read_text()
    start = readme.index("```python\nfrom tlkit import FineTuner")
    code = readme[start + len("```python\n"): readme.index("```", start + 10)]
    check = ("import pathlib, sys, tlkit\n"
             "assert pathlib.Path(tlkit.__file__).is_relative_to(pathlib.Path(sys.prefix)), tlkit.__file__\n")
    out = subprocess.run([str(env_dir / "bin" / "python"), "-c", check + code], capture_output=True, text=True,
                         cwd=user_folder, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Prediction(label=" in out.stdout and (user_folder / "runs" / "mobilenetv2-python" / "best.safetensors").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")
def test_tlkit_train_and_evaluate_run_offline_from_the_wheel(installed, user_folder):
    """The README's "your own photos" commands, on the shipped sample, with no weights named."""
    env_dir, env = installed
    tlkit = str(env_dir / "bin" / "tlkit")
    train = subprocess.run([tlkit, "train", "--set", "data.root=examples/garbage/data", "--set", "output_dir=run",
                            "--set", "train.epochs=1", "--set", "train.progress=false", "--recipe", "linear-probe",
                            "--set", "backbone.data_config.input_size=[3,160,120]"],
                           capture_output=True, text=True, cwd=user_folder, env=env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "mobilenetv2_100: weights file" in train.stderr and "mobilenetv2_100_tf_qat_dequant" in train.stderr
    printed = json.loads(train.stdout.splitlines()[-1])
    again = subprocess.run([tlkit, "evaluate", "--checkpoint", "run", "--split", "val"], capture_output=True,
                           text=True, cwd=user_folder, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["top1"] == printed["top1"]
    cli = subprocess.run([tlkit, "--help"], check=True, capture_output=True, text=True, env=env)
    assert "export" in cli.stdout and "predict" in cli.stdout
