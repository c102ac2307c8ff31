"""A run folder has one writer; SIGTERM saves like Ctrl-C; the same command twice gives the same model."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import copy_sample, tiny_tuner

from tlkit import ImageFolderDataset
from tlkit.checkpoint import load_checkpoint
from tlkit.runlock import OutputDirError, RunLockedError

CLASSES = ["cardboard", "glass", "metal"]
SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def _cli(root, out, *extra):
    return [sys.executable, "-m", "tlkit", "train", "--set", f"data.root={root}", "--set", f"output_dir={out}",
            "--set", "backbone.name=test_resnet", "--set", "backbone.pretrained=false",
            "--set", "backbone.data_config.input_size=[3,64,64]", "--set", "train.batch_size=4",
            "--set", "train.device=cpu", "--set", "train.precision=fp32", "--set", "train.progress=false",
            "--set", "train.warmup_epochs=0", *extra]


def test_fit_refuses_a_folder_another_process_trains_into(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from tlkit.runlock import RunLock\n"
        f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        train = ImageFolderDataset(copy_sample(tmp_path / "train", CLASSES, 2))
        with pytest.raises(RunLockedError, match=rf"{run}.*pid {holder.pid}"):
            tiny_tuner(CLASSES, output_dir=run).fit(train)
        assert sorted(p.name for p in run.iterdir()) == [".tlkit.lock"]  # nothing of ours was written
    finally:
        holder.kill()
        holder.wait()
    tiny_tuner(CLASSES, output_dir=run, epochs=1).fit(train)  # the kernel dropped the dead holder's lock
    assert (run / "last.safetensors").is_file()


def test_an_unwritable_output_folder_fails_before_the_first_epoch(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    train = ImageFolderDataset(copy_sample(tmp_path / "train", CLASSES, 2))
    tuner = tiny_tuner(CLASSES, output_dir=blocker / "run")
    start = time.perf_counter()
    with pytest.raises(OutputDirError, match=str(blocker / "run")):
        tuner.fit(train)
    assert tuner.step == 0 and time.perf_counter() - start < 5


def test_the_same_cli_command_twice_gives_bit_identical_weights(tmp_path):
    root = copy_sample(tmp_path / "data", CLASSES, 4)
    for name in ("a", "b"):
        proc = subprocess.run(_cli(root, tmp_path / name, "--set", "train.epochs=1"), capture_output=True,
                              text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    a, _ = load_checkpoint(tmp_path / "a" / "last.safetensors")
    b, _ = load_checkpoint(tmp_path / "b" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_keeps_the_finished_epochs_and_says_how_to_resume(tmp_path):
    root = copy_sample(tmp_path / "data", CLASSES, 4)
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(root, out, "--set", "train.epochs=200"), stderr=subprocess.PIPE, text=True,
                            env=ENV)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("tlkit train: interrupted by SIGTERM; ") and "keeps the files of epoch" in last, err
    assert last.endswith("--resume") and "Traceback" not in err
    assert (out / "last.state.pt").is_file() and not (out / ".tlkit.lock").exists()


def test_fit_refuses_a_folder_that_holds_a_run_until_resume_or_overwrite(tmp_path):
    from tlkit.runlock import RUN_FILES, RunExistsError

    data = ImageFolderDataset(copy_sample(tmp_path / "d", per_class=2))
    run = tmp_path / "run"
    tiny_tuner(data.classes, output_dir=run, epochs=1).fit(data, data)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name in RUN_FILES}
    assert {"best.safetensors", "last.state.pt", "metrics.jsonl"} <= set(before)
    with pytest.raises(RunExistsError, match="already holds a run") as info:
        tiny_tuner(data.classes, output_dir=run, epochs=1).fit(data, data)
    assert set(info.value.files) == set(before)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name in RUN_FILES} == before  # untouched
    # overwrite: the old run's files go first; a run without validation writes no best.safetensors,
    # so none may be left over from the old run.
    tiny_tuner(data.classes, output_dir=run, epochs=1).fit(data, None, overwrite=True)
    assert not (run / "best.safetensors").exists() and (run / "last.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    tiny_tuner(data.classes, output_dir=run, epochs=2).fit(data, None, resume=True)  # resume extends it
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_the_example_handles_sigterm_like_tlkit_train_and_resumes(tmp_path):
    """Issue 23: the flagship example ends on SIGTERM with one line and the command that resumes it."""
    import shlex

    root = copy_sample(tmp_path / "data", CLASSES, 4)
    out = tmp_path / "run"
    example = Path(__file__).resolve().parents[1] / "examples" / "garbage" / "train.py"
    args = ["--data", str(root), "--backbone", "test_resnet", "--recipe", "scratch", "--output", str(out),
            "--epochs", "200", "--no-progress",
            "--set", "backbone.pretrained=false", "--set", "backbone.data_config.input_size=[3,64,64]",
            "--set", "train.batch_size=4", "--set", "train.device=cpu", "--set", "train.warmup_epochs=0"]
    proc = subprocess.Popen([sys.executable, str(example), *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=ENV)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    line = err.strip()
    assert line.startswith("train.py: interrupted by SIGTERM; ") and "keeps the files of epoch" in line, err
    again = shlex.split(line.split("continue with: ", 1)[1])
    assert again[-1] == "--resume" and again[1] == str(example)
    done = int(line.split("keeps the files of epoch ")[1].split(";")[0])
    again[again.index("200")] = str(done + 1)  # resume, and stop one epoch later
    proc = subprocess.run([sys.executable, *again[1:]], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == done + 1
