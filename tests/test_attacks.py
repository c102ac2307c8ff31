"""Issue 24: a stranger's photo, run folder or model folder can do no harm.

Each test is one attack of the issue, numbered as there, run against the entry point a user
would take. What must not happen (a process started, a file outside the folder written or
published, memory or time without bound) is observed: processes with an audit hook, writes
through the victim file's bytes, allocations through the file sizes asked for.
"""

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, copy_sample, tiny_tuner
from PIL import Image

from tlkit import BadImageError, FineTuner, ImageFolderDataset, load_image

CLASSES = ["cardboard", "glass", "metal"]
_STARTED: list[tuple[str, str]] = []


def _audit(event: str, args) -> None:
    # Installed once for the process (audit hooks cannot be removed); it only records.
    if event in {"subprocess.Popen", "os.posix_spawn", "os.exec", "os.system", "os.spawn"}:
        _STARTED.append((event, repr(args)[:200]))


sys.addaudithook(_audit)

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 8 8
%%EndComments
0 0 moveto 8 8 lineto stroke
showpage
%%EOF
"""


@pytest.fixture
def fake_gs(tmp_path, monkeypatch):
    """A stand-in ``gs`` first on PATH that records being started, and Pillow's cached answer reset."""
    from PIL import EpsImagePlugin

    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-was-started"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    _STARTED.clear()
    return marker


# -- 1. image formats -------------------------------------------------------------------------------
def test_a_postscript_photo_never_starts_ghostscript_anywhere_a_photo_is_read(tmp_path, fake_gs):
    photo = tmp_path / "data" / "glass" / "photo.jpg"
    copy_sample(tmp_path / "data", CLASSES, 2)
    photo.write_bytes(EPS)
    with pytest.raises(BadImageError, match=r"photo\.jpg: cannot decode: not a JPEG, PNG, BMP"):
        load_image(photo)  # training, the scan, predict, calibration and rank all read through it
    tuner = tiny_tuner(CLASSES)
    with pytest.warns(Warning, match="photo.jpg"):
        assert tuner.predict(photo) == []
    report = ImageFolderDataset(tmp_path / "data").scan()
    assert [b.path.name for b in report.bad] == ["photo.jpg"]
    from tlkit.demo import _classify_upload

    with pytest.raises(ValueError, match="photo.jpg: cannot decode") as info:
        _classify_upload(tuner, str(photo), "photo.jpg", "none", 2**20, ValueError)
    assert str(tmp_path) not in str(info.value)  # no server path in what a visitor sees
    assert not fake_gs.exists() and _STARTED == []


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "SGI", "PCX", "QOI", "IM", "SPIDER", "MSP", "XBM", "ICNS", "DDS"])
def test_rare_decoders_never_parse_a_file_named_like_a_photo(tmp_path, fmt):
    src = Image.new("1" if fmt in {"XBM", "MSP"} else ("L" if fmt == "SPIDER" else "RGB"), (16, 16))
    import io

    photo, buf = tmp_path / "photo.jpg", io.BytesIO()
    try:
        # To a buffer: saving a SPIDER file under a ".jpg" name makes Pillow register ".jpg" as
        # SPIDER for the rest of the process.
        src.save(buf, format=fmt)
    except (KeyError, OSError, ValueError) as e:  # a Pillow built without that writer
        pytest.skip(f"Pillow cannot write {fmt}: {e}")
    photo.write_bytes(buf.getvalue())
    assert Image.open(photo).format == fmt  # Pillow alone decodes it by content
    with pytest.raises(BadImageError, match="not a JPEG"):
        load_image(photo)


@pytest.mark.parametrize("mode,side,refused", [("I;16", 9000, True), ("RGBA", 7000, True), ("RGB", 9000, False)])
def test_decode_memory_is_bounded_per_pixel_format(tmp_path, mode, side, refused):
    """A 0.2 MB 16-bit PNG of 81 Mpx took 2.2 GB to decode: its bytes per pixel count now."""
    import struct
    import zlib

    path = tmp_path / "big.png"
    # A valid PNG header claiming side x side pixels (the data is never reached when refused).
    depth, colour = {"I;16": (16, 0), "RGBA": (8, 6), "RGB": (8, 2)}[mode]
    ihdr = struct.pack(">IIBBBBB", side, side, depth, colour, 0, 0, 0)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    if refused:
        with pytest.raises(BadImageError, match=r"needs about \d+ MiB to decode, over the limit"):
            load_image(path)
    else:  # within the budget: refused later only because its pixel data is missing
        with pytest.raises(BadImageError, match="truncated|cannot decode"):
            load_image(path)


# -- 2. a downloaded run folder is data, not instructions ---------------------------------------------
@pytest.fixture
def strangers_run(tmp_path):
    """A run folder as a stranger would ship it: a real checkpoint, and a config.yaml whose data
    root points at the victim's private folders, with classes named after them."""
    import shutil

    from tlkit import DatasetConfig, RunConfig

    private = tmp_path / "home"
    for name, source in zip(("Desktop", "Documents", "Pictures"), CLASSES):
        (private / name).mkdir(parents=True)
        for photo in sorted((SAMPLE / source).iterdir())[:2]:
            shutil.copy(photo, private / name / f"secret-{name}-{photo.name}")
    run = tmp_path / "downloaded-run"
    run.mkdir()
    tiny_tuner(["Desktop", "Documents", "Pictures"]).save(run / "best.safetensors")
    config = RunConfig(data=DatasetConfig(root=private, val_fraction=0.5), output_dir=run)
    (run / "config.yaml").write_text(config.to_yaml())  # written by the stranger: unsigned
    return run, private


def test_the_demo_never_publishes_what_a_downloaded_run_folder_points_at(strangers_run, capsys):
    import argparse

    from tlkit.cli._use import _demo_examples

    run, private = strangers_run
    tuner = FineTuner.load(run, device="cpu", progress=False)
    chosen = _demo_examples(tuner, argparse.Namespace(checkpoint=str(run), examples=None))
    assert chosen == []
    assert "not written by tlkit under this user account" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["evaluate", "--split", "val"],
                                     ["export", "--format", "onnx-int8", "--output", "OUT"]])
def test_evaluate_and_calibration_refuse_the_data_root_of_a_downloaded_run(strangers_run, tmp_path, capsys, command):
    from tlkit.cli import main

    run, private = strangers_run
    argv = [a.replace("OUT", str(tmp_path / "q.onnx")) for a in command]
    assert main([argv[0], "--checkpoint", str(run), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert "not written by tlkit under this user account" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()


def test_a_run_trained_here_reads_its_recorded_root_and_says_so(tmp_path, capsys):
    from conftest import recorded_run

    from tlkit.cli import main

    root = copy_sample(tmp_path / "data", CLASSES, 4)
    recorded_run(tmp_path / "run", root, CLASSES, val_fraction=0.25)  # signed, as tlkit train signs it
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--split", "val"]) == 0
    assert f"reading {root} as recorded in" in capsys.readouterr().err
    # An edit of the signed config (a new data root) makes it a stranger's again.
    text = (tmp_path / "run" / "config.yaml").read_text().replace(str(root), str(tmp_path))
    (tmp_path / "run" / "config.yaml").write_text(text)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--split", "val"]) == 2


# -- 3. symlinks in a run folder are never followed on write ------------------------------------------
def _cli_args(root, run, *extra):
    return ["train", "--set", f"data.root={root}", "--set", f"output_dir={run}", "--set", "backbone.name=test_resnet",
            "--set", "backbone.pretrained=false", "--set", "backbone.data_config.input_size=[3,64,64]",
            "--set", "train.batch_size=4", "--set", "train.device=cpu", "--set", "train.progress=false",
            "--set", "train.epochs=1", "--set", "train.warmup_epochs=0", *extra]


@pytest.mark.parametrize("planted", [".tlkit.lock", "config.yaml", "metrics.jsonl", "last.safetensors"])
def test_a_planted_link_in_a_new_run_folder_never_has_its_target_written(tmp_path, capsys, planted):
    from tlkit.cli import main

    root = copy_sample(tmp_path / "data", CLASSES, 3)
    victim = tmp_path / "notes.txt"
    victim.write_text("my notes\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / planted).symlink_to(victim)
    code = main(_cli_args(root, run))
    assert victim.read_text() == "my notes\n"  # the target is untouched, whatever happened
    err = capsys.readouterr().err
    if planted in {".tlkit.lock", "config.yaml"}:
        assert code != 0 and f"{planted} is a symbolic link" in err and str(victim) in err
        assert (run / planted).is_symlink()  # and the link itself is left for the user to look at
    else:  # a run file: the folder holds a run; --overwrite removes the link itself, never its target
        assert code == 2 and "already holds a run" in err
        assert main(_cli_args(root, run, "--overwrite")) == 0
        assert victim.read_text() == "my notes\n" and not (run / planted).is_symlink()


def test_resuming_a_downloaded_run_with_planted_links_writes_through_none(tmp_path, capsys):
    from tlkit.cli import main

    root = copy_sample(tmp_path / "data", CLASSES, 3)
    run = tmp_path / "run"
    assert main(_cli_args(root, run)) == 0
    victim = tmp_path / "notes.txt"
    victim.write_text("my notes\n")
    for name in (".tlkit.lock", ".metrics.jsonl.tmp-1-0000"):
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(victim)
    capsys.readouterr()
    code = main(_cli_args(root, run, "--set", "train.epochs=2", "--resume"))
    assert victim.read_text() == "my notes\n" and code != 0
    assert ".tlkit.lock is a symbolic link" in capsys.readouterr().err


def test_atomic_writes_refuse_a_link_and_create_their_temporary_file_exclusively(tmp_path):
    from tlkit._fs import SymlinkRefused, atomic_write_bytes

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "out").symlink_to(victim)
    with pytest.raises(SymlinkRefused, match="out: is a symbolic link|is a symbolic link"):
        atomic_write_bytes(tmp_path / "out", b"new")
    assert victim.read_bytes() == b"keep"
    atomic_write_bytes(tmp_path / "fresh", b"new")
    assert (tmp_path / "fresh").read_bytes() == b"new" and stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == \
        0o666 & ~_umask()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- 4. a stranger's timm folder is checked as strictly as a checkpoint -------------------------------
@pytest.fixture
def timm_folder(tmp_path):
    from tlkit.hub import save_pretrained

    return save_pretrained(tiny_tuner(CLASSES), tmp_path / "model")


def _edit(folder, **change):
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_folder_naming_a_huge_architecture_is_refused_before_any_real_allocation(timm_folder, monkeypatch):
    import timm

    from tlkit.hub import load_pretrained

    devices, real = [], timm.create_model

    def spy(*args, **kwargs):
        devices.append(torch.empty(0).device.type)  # the default device the model is built on
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    _edit(timm_folder, architecture="vit_huge_patch14_224", model_args={})
    with pytest.raises(ValueError, match="does not match the model"):
        load_pretrained(timm_folder)
    assert devices and set(devices) == {"meta"}  # the 632 M-parameter ViT was never built for real


@pytest.mark.parametrize("change,message", [
    ({"model_args": {"img_size": 65536}}, r"model_args\.img_size"),
    ({"model_args": {"drop_rate": 5.0}}, r"model_args\.drop_rate"),
    ({"pretrained_cfg": {"input_size": [3, 4096, 64]}}, "has a side over 2048"),
    ({"label_names": ["a", "a", "b"], "num_classes": 3}, "holds 'a' twice"),
    ({"label_names": ["a", "b\x1b[2J", "c"], "num_classes": 3}, "control or invisible character"),
    ({"label_names": ["a", "b" * 100_000, "c"], "num_classes": 3}, r"label_names\[1\]"),
])
def test_folder_values_are_bounded_like_a_checkpoint_header(timm_folder, change, message):
    from tlkit.hub import load_pretrained

    _edit(timm_folder, **change)
    with pytest.raises(ValueError, match=message):
        load_pretrained(timm_folder)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_folder_file_linking_elsewhere_is_not_read(timm_folder, tmp_path, name):
    from tlkit.hub import load_pretrained

    outside = tmp_path / f"outside-{name}"
    (timm_folder / name).rename(outside)
    (timm_folder / name).symlink_to(outside)
    with pytest.raises(ValueError, match=f"{name}: is a symbolic link"):
        load_pretrained(timm_folder)


def test_a_deeply_nested_config_is_a_value_error_not_a_recursion_error(timm_folder):
    from tlkit.hub import load_pretrained

    (timm_folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested deeper than 32 levels"):
        load_pretrained(timm_folder)


# -- 5. export never overwrites its input, or anything, unasked ------------------------------------------
@pytest.fixture
def run_with_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    tiny_tuner(CLASSES).save(run / "best.safetensors")
    (run / "last.safetensors").write_bytes((run / "best.safetensors").read_bytes())
    return run


@pytest.mark.parametrize("output", ["run/best.safetensors", "run", "run/last.safetensors", "."])
def test_export_refuses_to_write_over_its_checkpoint_or_run(run_with_checkpoint, tmp_path, capsys, output,
                                                           monkeypatch):
    from tlkit.cli import main

    monkeypatch.chdir(tmp_path)
    before = {p.name: p.read_bytes() for p in run_with_checkpoint.iterdir()}
    for fmt in ("onnx", "timm"):
        code = main(["export", "--checkpoint", "run/best.safetensors", "--output", output, "--format", fmt,
                     "--overwrite"])
        assert code == 2 and "is the checkpoint being exported" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run_with_checkpoint.iterdir()} == before


def test_export_replaces_an_existing_file_only_with_overwrite(run_with_checkpoint, tmp_path, capsys):
    from tlkit.cli import main

    pytest.importorskip("onnx")
    mine = tmp_path / "thesis.onnx"
    mine.write_bytes(b"my own file")
    args = ["export", "--checkpoint", str(run_with_checkpoint), "--output", str(mine)]
    assert main(args) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert mine.read_bytes() == b"my own file"
    assert main([*args, "--overwrite"]) == 0 and mine.read_bytes()[:2] != b"my"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_timm_folder_export_is_replaced_as_one_unit(run_with_checkpoint, tmp_path, monkeypatch):
    """9: killed between its two files, an export left new weights under old label_names."""
    from tlkit import hub

    folder = tmp_path / "out"
    tuner = FineTuner.load(run_with_checkpoint, device="cpu", progress=False)
    hub.save_pretrained(tuner, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    renamed = tiny_tuner(["x", "y", "z"])

    def killed(*args, **kwargs):  # the kill lands after model.safetensors, before the swap
        real(*args, **kwargs)
        raise KeyboardInterrupt

    real = hub.atomic_write_bytes
    monkeypatch.setattr(hub, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        hub.save_pretrained(renamed, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # all old, never mixed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    monkeypatch.setattr(hub, "atomic_write_bytes", real)
    hub.save_pretrained(renamed, folder)
    assert json.loads((folder / "config.json").read_text())["label_names"] == ["x", "y", "z"]


# -- 6. a resume state is read in bounded time and memory ---------------------------------------------------
def _state_file(path, value):
    torch.save({"epoch": 1, "hostile": value}, path)
    return path


def test_a_state_sharing_one_list_2_to_the_64_ways_loads_in_linear_time(tmp_path):
    """A 1.8 KB file: l = [l, l] 64 deep. Walked as a tree it never finished; in a child process
    here, so a hang fails the test instead of stopping the suite."""
    import subprocess
    import textwrap

    code = textwrap.dedent(f"""
        import torch
        from tlkit.checkpoint import _tree_sha256, load_training_state
        from tlkit import CheckpointError
        l = []
        for _ in range(30):  # 2**30 paths: within the depth bound, loaded in linear time
            l = [l, l]
        state = {{"epoch": 1, "hostile": l}}
        torch.save({{**state, "sha256": _tree_sha256(state)}}, {str(tmp_path / "s.pt")!r})
        assert load_training_state({str(tmp_path / "s.pt")!r})["epoch"] == 1
        for _ in range(34):  # 64 deep: past the depth bound, refused at once
            l = [l, l]
        torch.save({{"epoch": 1, "hostile": l}}, {str(tmp_path / "s.pt")!r})
        try:
            load_training_state({str(tmp_path / "s.pt")!r})
        except CheckpointError as e:
            assert "nested deeper than 32 levels" in str(e)
            print("loaded")
    """)
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": src})
    assert out.returncode == 0 and out.stdout.strip() == "loaded", out.stderr[-2000:]
    assert (tmp_path / "s.pt").stat().st_size < 10_000


def test_a_self_referencing_state_is_a_checkpoint_error(tmp_path):
    from tlkit import CheckpointError
    from tlkit.checkpoint import load_training_state

    loop: list = []
    loop.append(loop)
    path = _state_file(tmp_path / "s.pt", loop)
    with pytest.raises(CheckpointError, match="contains itself|corrupted"):
        load_training_state(path)


def test_a_deeply_nested_state_is_a_checkpoint_error(tmp_path):
    from tlkit import CheckpointError
    from tlkit.checkpoint import load_training_state

    deep: list = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(CheckpointError, match="nested deeper than 32 levels"):
        load_training_state(_state_file(tmp_path / "s.pt", deep))


def test_a_compressed_state_record_is_refused_before_it_inflates(tmp_path):
    import zipfile

    from tlkit import CheckpointError
    from tlkit.checkpoint import load_training_state

    plain = _state_file(tmp_path / "plain.pt", torch.zeros(1_000_000))  # 4 MB of zeros
    packed = tmp_path / "last.state.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert packed.stat().st_size < plain.stat().st_size / 50
    with pytest.raises(CheckpointError, match="is compressed"):
        load_training_state(packed)


# -- 7. INT8 calibration is bounded in memory and keeps stdout for the JSON ----------------------------------
def test_histogram_calibration_is_capped_to_the_memory_and_stdout_stays_one_json_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    from tlkit import quantize
    from tlkit.cli import main

    root = copy_sample(tmp_path / "data", CLASSES, 4)
    tiny_tuner(CLASSES).save(tmp_path / "m.safetensors")
    per_photo = quantize.activation_bytes(tiny_tuner(CLASSES).model, (3, 64, 64))
    monkeypatch.setattr(quantize, "available_memory", lambda: 2 * 5 * per_photo)  # room for 5 photos
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--output", str(tmp_path / "q.onnx"),
                 "--format", "onnx-int8", "--calibration", str(root), "--calibration-method", "percentile"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["calibration_images"] == 5  # the whole of stdout is the one JSON object
    assert "calibrating on 5 of the 12 photos" in err and "Collecting tensor data" in err
    with pytest.raises(ValueError, match="give at most 5 photos"):  # the library refuses; the CLI thins
        tiny = tiny_tuner(CLASSES)
        quantize.export_onnx_int8(tiny.model, tmp_path / "q2.onnx", (3, 64, 64), torch.randn(12, 3, 64, 64),
                                  method="entropy")


# -- 8. the demo keeps nothing after SIGTERM, and a visitor cannot fill its disk --------------------------------
def test_sigterm_removes_the_demos_private_folder_with_the_uploads(tmp_path):
    pytest.importorskip("gradio")
    import signal
    import socket
    import subprocess
    import time

    import httpx

    ckpt = tiny_tuner(CLASSES).save(tmp_path / "m.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "tlkit", "demo", "--checkpoint", str(ckpt), "--port", str(port),
                             "--examples", str(SAMPLE / "glass")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(600):
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        photo = sorted((SAMPLE / "metal").iterdir())[0]
        r = httpx.post(url + "gradio_api/upload", files={"files": (photo.name, photo.read_bytes())})
        assert r.status_code == 200  # uploaded, never classified: kept in the private folder
        assert [p.name for p in temp.iterdir() if p.name.startswith("tlkit-demo-")]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert list(temp.iterdir()) == []  # the private folder, the upload and the example copies are gone


def test_a_visitors_uploads_are_bounded_per_client(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    import httpx

    from tlkit.demo import UPLOAD_QUOTA_FILES, launch_demo

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))
    demo = launch_demo(tiny_tuner(CLASSES), port=None, block=False, quiet=True, max_upload_bytes=50_000)
    try:
        codes = [httpx.post(demo.local_url + "gradio_api/upload", files={"files": ("x.jpg", b"\xff" * 40_000)}).status_code
                 for _ in range(UPLOAD_QUOTA_FILES + 3)]
    finally:
        demo.close()
    assert codes[: UPLOAD_QUOTA_FILES] == [200] * UPLOAD_QUOTA_FILES and set(codes[UPLOAD_QUOTA_FILES + 1:]) == {429}


# -- 10. smaller ones ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("relabel", ["keep_digest", "rename_digest"])
def test_relabelling_a_v2_header_as_v1_does_not_switch_its_digest_off(tmp_path, relabel):
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from tlkit import CheckpointError
    from tlkit.checkpoint import FORMAT_V1

    path = tiny_tuner(CLASSES).save(tmp_path / "best.safetensors")
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    header["format"] = FORMAT_V1
    header["tlkit"] = header["tlkit"].replace('"glass"', '"flass"')  # the tamperer's edit
    if relabel == "rename_digest":
        header["digesx"] = header.pop("digest")
    path.write_bytes(save(load_file(str(path)), metadata=header))
    with pytest.raises(CheckpointError, match="does not match its digest|header with other keys"):
        FineTuner.load(path)


def test_non_finite_weights_are_refused_at_load_and_predict_never_prints_nan(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from tlkit import CheckpointError
    from tlkit.checkpoint import header_digest, tensors_sha256
    from tlkit.cli import main

    path = tiny_tuner(CLASSES).save(tmp_path / "best.safetensors")
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    state = load_file(str(path))
    state["fc.weight"][0, 0] = float("nan")  # a forger recomputes both digests
    header["sha256"] = tensors_sha256(state)
    header["digest"] = header_digest(json.loads(header["tlkit"]), header["sha256"])
    path.write_bytes(save(state, metadata=header))
    with pytest.raises(CheckpointError, match=r"fc\.weight.*not finite"):
        FineTuner.load(path)
    photo = sorted((SAMPLE / "glass").iterdir())[0]
    assert main(["predict", "--checkpoint", str(path), str(photo)]) == 2
    out, err = capsys.readouterr()
    assert "NaN" not in out and "not finite" in err


def test_a_glob_over_a_symlink_loop_ends(tmp_path):
    from tlkit.images import expand_image_paths

    root = copy_sample(tmp_path / "photos", CLASSES, 1)
    (root / "glass" / "loop").symlink_to(root, target_is_directory=True)
    found = expand_image_paths([f"{root}/**/*.jpg"])
    assert len(found) == 3 and all("loop" not in str(p) for p in found)
    assert len(expand_image_paths([root])) == 3  # a folder: links to folders are not followed either


def test_ten_thousand_bad_files_give_a_short_report(tmp_path):

    root = copy_sample(tmp_path / "data", CLASSES, 1)
    for i in range(10_000):
        (root / "glass" / f"bad{i}.jpg").write_bytes(b"not a photo")
    report = ImageFolderDataset(root).scan()
    assert len(report.bad) == 10_000
    summary = report.summary()
    assert len(summary.splitlines()) <= 25 and "and 9990 more" in summary


def test_one_empty_calibration_photo_costs_only_itself(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from tlkit.cli import main

    root = copy_sample(tmp_path / "data", CLASSES, 3)
    (root / "glass" / "empty.jpg").write_bytes(b"")
    tiny_tuner(CLASSES).save(tmp_path / "m.safetensors")
    assert main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--output", str(tmp_path / "q.onnx"),
                 "--format", "onnx-int8", "--calibration", str(root)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["calibration_images"] == 9 and "empty.jpg: empty file" in err


def test_lock_holder_records_and_scan_summaries_carry_no_raw_control_characters(tmp_path):
    from tlkit.runlock import _busy_message

    holder = {"pid": 1, "host": "evil\x1b]0;pwned\x07host" + "x" * 10_000, "cmd": "\x1b[2J" * 50}
    message = _busy_message(tmp_path, holder)
    assert "\x1b" not in message and "\x07" not in message and len(message) < 1000
    root = copy_sample(tmp_path / "data", CLASSES, 1)
    (root / "glass" / "bad\x1b[31m.jpg").write_bytes(b"x")
    summary = ImageFolderDataset(root).scan().summary()
    assert "\x1b" not in summary and "\\x1b" in summary
