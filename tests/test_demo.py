"""The web demo: served by Gradio, driven end to end in headless Chromium.

Browser tests skip when Chromium or Playwright is missing, unless ``TLKIT_BROWSER_TESTS=required``
(CI sets it), which turns the skip into a failure.
"""

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE, tiny_tuner

from tlkit import FineTuner
from tlkit.cli import main

gr = pytest.importorskip("gradio")
from tlkit.demo import _describe, build_demo, launch_demo, private_upload_folder  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium on a closed network: no background connections, no sandbox (CI runs as root).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
CLASSES = ["cardboard", "glass", "metal"]
LIMIT = 2**20  # the served demo's upload limit, bytes (the shipped photos are ~30 kB)


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = "playwright is not installed" if sync_playwright is None else (None if CHROMIUM else "chromium is not installed")
    if missing:
        if os.environ.get("TLKIT_BROWSER_TESTS") == "required":
            pytest.fail(f"browser test required but {missing}")
        pytest.skip(missing)
    return sync_playwright


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Gradio's upload cache for this module's servers: a folder of its own, so files can be counted."""
    folder = tmp_path_factory.mktemp("gradio-cache")
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)  # read when components and the server are created
    yield folder
    os.environ.pop("GRADIO_TEMP_DIR") if before is None else os.environ.update(GRADIO_TEMP_DIR=before)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A fresh upload cache for a test that starts its own server."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _client(demo, tmp_path):
    from gradio_client import Client

    # The client's downloads go elsewhere: the cache must hold only what the server keeps.
    return Client(demo.local_url, verbose=False, download_files=str(tmp_path / "client"))


@pytest.fixture(scope="module")
def served(tmp_path_factory, cache):
    """A tiny trained-from-scratch model, saved, loaded back as the CLI would, and served."""
    tuner = tiny_tuner(CLASSES)
    ckpt = tuner.save(tmp_path_factory.mktemp("demo") / "model.safetensors", metrics={"top1": 0.5, "epoch": 0})
    loaded = FineTuner.load(ckpt, device="cpu", progress=False)
    demo = launch_demo(loaded, port=None, block=False, quiet=True, max_upload_bytes=LIMIT)
    yield loaded, demo
    demo.close()


def test_api_endpoint_returns_predict_probabilities(served, tmp_path):
    from gradio_client import handle_file

    tuner, demo = served
    photo = sorted((SAMPLE / "metal").iterdir())[0]
    _, out = _client(demo, tmp_path).predict(handle_file(str(photo)), api_name="/classify")
    expected = tuner.predict(photo)[0]
    assert out["label"] == expected.label
    shown = {c["label"]: c["confidence"] for c in out["confidences"]}
    assert list(shown) == sorted(expected.probabilities, key=expected.probabilities.get, reverse=True)
    assert shown == pytest.approx(expected.probabilities, abs=1e-6)


def test_api_endpoint_names_a_bad_file_by_its_name_only(served, cache, tmp_path):
    from gradio_client import handle_file

    _, demo = served
    bad = tmp_path / "broken.jpg"
    bad.write_bytes((SAMPLE / "glass" / sorted(os.listdir(SAMPLE / "glass"))[0]).read_bytes()[:300])
    with pytest.raises(Exception, match="broken.jpg: cannot decode") as info:
        _client(demo, tmp_path).predict(handle_file(str(bad)), api_name="/classify")
    assert str(cache) not in str(info.value) and "/" not in str(info.value).split(":")[0]  # no server path


def test_uploads_are_deleted_once_classified_and_the_rest_at_shutdown(served, own_cache, tmp_path):
    from gradio_client import handle_file

    tuner, _ = served
    photos = [sorted((SAMPLE / c).iterdir())[2] for c in CLASSES]
    uploaded = {p.read_bytes() for p in photos}
    demo = launch_demo(tuner, port=None, block=False, quiet=True, max_upload_bytes=LIMIT)
    client = _client(demo, tmp_path)
    try:
        for photo in photos:
            client.predict(handle_file(str(photo)), api_name="/classify")
        kept = _files(own_cache)
        # Before: every upload stayed in Gradio's cache. Now only the page's small previews do.
        assert not [f for f in kept if f.read_bytes() in uploaded]
        assert [f.suffix for f in kept] == [".webp"] * len(photos)
    finally:
        demo.close()
    assert _files(own_cache) == []  # the previews went at shutdown


def test_gradio_refuses_an_upload_over_the_limit_before_storing_it(own_cache):
    import httpx

    tuner = tiny_tuner(CLASSES)
    demo = launch_demo(tuner, port=None, block=False, quiet=True, max_upload_bytes=100_000)
    try:
        r = httpx.post(demo.local_url + "gradio_api/upload", files={"files": ("huge.jpg", b"\xff" * 300_000)})
        assert r.status_code == 413 and "100000 bytes" in r.text
        assert _files(own_cache) == []
    finally:
        demo.close()


def test_tlkit_checks_the_size_before_decoding_when_embedded_without_gradios_limit(own_cache, tmp_path):
    from gradio_client import handle_file

    demo = build_demo(tiny_tuner(CLASSES), max_upload_bytes=10_000)
    demo.launch(prevent_thread_lock=True, quiet=True)  # embedded: no max_file_size given to Gradio
    photo = sorted((SAMPLE / "glass").iterdir())[0]  # ~30 kB
    try:
        size = f"{photo.stat().st_size / 1024:.1f} KiB"
        with pytest.raises(Exception, match=rf"{photo.name}: {size} is over this demo's upload limit of 9.8 KiB"):
            _client(demo, tmp_path).predict(handle_file(str(photo)), api_name="/classify")
        assert _files(own_cache) == []  # refused, and deleted
    finally:
        demo.close()


def test_private_upload_folder_is_removed_on_exit(monkeypatch):
    monkeypatch.delenv("GRADIO_TEMP_DIR")
    with private_upload_folder() as folder:
        assert os.environ["GRADIO_TEMP_DIR"] == str(folder) and folder.is_dir()
        (folder / "upload.jpg").write_bytes(b"x")
    assert not folder.exists() and "GRADIO_TEMP_DIR" not in os.environ
    monkeypatch.setenv("GRADIO_TEMP_DIR", "/somewhere/chosen")
    with private_upload_folder() as folder:  # the user's choice is kept
        assert folder is None and os.environ["GRADIO_TEMP_DIR"] == "/somewhere/chosen"


def test_class_names_are_shown_as_text_on_the_page():
    tuner = tiny_tuner(["![x](http://tracker.example/p.png)", "<img src=x onerror=alert(1)>", "a\x1b[2Jb"])
    text = _describe(tuner)
    assert not re.search(r"(?<!\\)[<>\[\]()!]", text) and "\x1b" not in text  # every markup character escaped
    assert "\\<img src\\=x onerror\\=alert\\(1\\)\\>" in text


def test_page_shows_the_predicted_label_in_chromium(served, cache, tmp_path):
    sync_playwright = _browser_or_skip()
    tuner, demo = served
    photos = [sorted((SAMPLE / c).iterdir())[1] for c in CLASSES]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(demo.local_url)
        for photo in photos:
            expected = tuner.predict(photo)[0]
            page.locator("input[type=file]").set_input_files(str(photo))
            # Wait for this photo's answer: the label text and its top-3 rows.
            label = page.get_by_test_id("label-output-value")
            label.wait_for(timeout=60_000)
            page.wait_for_function(
                "n => document.querySelectorAll('.confidence-set').length === n", arg=3, timeout=60_000)
            assert label.inner_text().strip() == expected.label
            rows = [t.split("\n") for t in page.locator(".confidence-set").all_inner_texts()]
            top3 = sorted(expected.probabilities.items(), key=lambda kv: -kv[1])[:3]
            assert [r[0].strip() for r in rows] == [c for c, _ in top3]
            assert [r[-1].strip() for r in rows] == [f"{round(v * 100)}%" for _, v in top3]
            page.locator("button[aria-label='Clear']").first.click()
            label.wait_for(state="detached", timeout=30_000)
        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    uploaded = {p.read_bytes() for p in photos}
    assert not [f for f in _files(cache) if f.read_bytes() in uploaded]  # the page's uploads are gone too


def test_build_demo_rejects_bad_arguments(served):
    tuner, _ = served
    with pytest.raises(ValueError, match="top_k"):
        build_demo(tuner, top_k=0)
    with pytest.raises(ValueError, match="tta"):
        build_demo(tuner, tta="rotate")
    with pytest.raises(ValueError, match="max_upload_bytes"):
        build_demo(tuner, max_upload_bytes=0)


def test_cli_demo_without_gradio_says_how_to_install(tmp_path, monkeypatch, capsys):
    tuner = tiny_tuner(CLASSES)
    ckpt = tuner.save(tmp_path / "m.safetensors")
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["demo", "--checkpoint", str(ckpt)]) == 2
    assert 'pip install "tlkit[demo]"' in capsys.readouterr().err


def test_cli_demo_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_demo_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--host", "--port", "--top-k", "--tta", "--device", "--share", "--max-upload-mb",
                 "--examples"):
        assert flag in out


def test_cli_demo_refuses_a_bad_upload_limit(tmp_path, capsys):
    ckpt = tiny_tuner(CLASSES).save(tmp_path / "m.safetensors")
    assert main(["demo", "--checkpoint", str(ckpt), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb must be in (0, 1024]" in capsys.readouterr().err


def _gallery_values(demo) -> list:
    """The example thumbnails of the page (Gradio's ``gallery`` component), one list per gallery."""
    return [c["props"]["value"] for c in demo.config["components"] if c.get("type") == "gallery"]


def test_example_photos_are_shown_under_neutral_names_and_a_missing_one_is_named(served, tmp_path):
    tuner, _ = served
    photos = [sorted((SAMPLE / c).iterdir())[2] for c in CLASSES]
    assert _gallery_values(build_demo(tuner)) == []
    (shown,) = _gallery_values(build_demo(tuner, examples=photos))
    names = [Path(item["image"]["path"]).name for item in shown]
    assert names == ["example-1.jpg", "example-2.jpg", "example-3.jpg"]  # no class name gives the answer away
    assert not any(c in str(shown) for c in CLASSES)
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        build_demo(tuner, examples=[tmp_path / "nope.jpg"])


def test_cli_demo_examples_default_to_one_photo_per_class_of_the_recorded_split(tmp_path):
    import argparse

    from conftest import copy_sample, recorded_run

    from tlkit import RunConfig, load_datasets
    from tlkit.cli._use import _demo_examples

    root = copy_sample(tmp_path / "data", CLASSES, 4)
    run = tmp_path / "run"
    args = argparse.Namespace(checkpoint=str(recorded_run(run, root, CLASSES, val_fraction=0.5)), examples=None)
    tuner = tiny_tuner(CLASSES)
    chosen = _demo_examples(tuner, args)
    _, val = load_datasets(RunConfig.from_file(run / "config.yaml").data)
    assert [p.parent.name for p in chosen] == CLASSES and {str(p) for p in chosen} <= {str(p) for p, _ in val.samples}
    assert _demo_examples(tuner, argparse.Namespace(checkpoint=str(run), examples="none")) == []
    assert len(_demo_examples(tuner, argparse.Namespace(checkpoint=str(run), examples=str(root)))) == 12
    (run / "config.yaml").unlink()
    assert _demo_examples(tuner, args) == []  # no recorded run: a page without examples


def test_clicking_an_example_photo_classifies_it_in_chromium(cache, tmp_path):
    sync_playwright = _browser_or_skip()
    tuner = FineTuner.load(tiny_tuner(CLASSES).save(tmp_path / "m.safetensors"), device="cpu", progress=False)
    photo = sorted((SAMPLE / "glass").iterdir())[3]
    demo = launch_demo(tuner, port=None, block=False, quiet=True, examples=[photo])
    try:
        expected = tuner.predict(photo)[0]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(demo.local_url)
            assert photo.name not in page.content()  # the thumbnail does not give the answer away
            page.locator(".thumbnail-item").first.click()
            label = page.get_by_test_id("label-output-value")
            label.wait_for(timeout=60_000)
            assert label.inner_text().strip() == expected.label
            browser.close()
        assert photo.is_file()  # the operator's photo is never deleted
    finally:
        demo.close()


def test_a_normal_click_sequence_never_shows_an_error_in_chromium(served, cache, tmp_path, capfd):
    """Issue 23: after a photo was classified (and its upload deleted) nothing on the page asks for it
    again; a broken photo is one line on the page and one line in the server log, no traceback."""
    sync_playwright = _browser_or_skip()
    tuner, demo = served
    good = sorted((SAMPLE / "metal").iterdir())[4]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(good.read_bytes()[:300])
    capfd.readouterr()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(demo.local_url)
        assert page.get_by_role("button", name="Classify").count() == 0  # nothing to press twice
        label = page.get_by_test_id("label-output-value")
        for photo in (good, bad, good):
            page.locator("input[type=file]").set_input_files(str(photo))
            if photo == bad:
                page.get_by_text("Could not classify").wait_for(timeout=60_000)
                assert page.get_by_text("broken.jpg: cannot decode").is_visible()
            else:
                label.wait_for(timeout=60_000)
                assert label.inner_text().strip() == tuner.predict(good)[0].label
                assert page.get_by_text("Could not classify").count() == 0
            page.wait_for_timeout(300)
            assert page.get_by_text("Error", exact=True).count() == 0  # no red error badges, no error toast
            page.locator("button[aria-label='Clear']").first.click()  # as a visitor does before the next photo
            page.wait_for_timeout(300)
            assert page.get_by_text("Error", exact=True).count() == 0
        browser.close()
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("tlkit demo:")] == \
        ["tlkit demo: broken.jpg: cannot decode" + err.split("tlkit demo: broken.jpg: cannot decode", 1)[1].splitlines()[0]]
    assert "Traceback" not in err


def test_the_api_reports_a_bad_file_without_a_traceback_in_the_log(served, tmp_path, capfd):
    from gradio_client import handle_file

    _, demo = served
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    capfd.readouterr()
    with pytest.raises(Exception, match="broken.jpg"):
        _client(demo, tmp_path).predict(handle_file(str(bad)), api_name="/classify")
    err = capfd.readouterr().err
    assert "Traceback" not in err and sum(line.startswith("tlkit demo: broken.jpg") for line in err.splitlines()) == 1


def test_a_prediction_below_the_reject_threshold_says_not_sure_on_the_page(tmp_path):
    from tlkit.demo import _classify_upload, _shown

    tuner = tiny_tuner(CLASSES)
    photo = sorted((SAMPLE / "glass").iterdir())[0]
    tuner.calibration = {"temperature": 1.0, "reject_threshold": 1.0}  # never sure enough
    preview, probabilities, status = _shown(lambda: _classify_upload(tuner, str(photo), photo.name, "none", 2**24,
                                                                    ValueError), str(photo))
    assert preview is not None and set(probabilities) == set(CLASSES)
    assert status.startswith("**Not sure.**") and "100%" in status
    tuner.calibration = {"temperature": 1.0, "reject_threshold": 0.0}
    assert _shown(lambda: _classify_upload(tuner, str(photo), photo.name, "none", 2**24, ValueError), str(photo))[2] == ""


def test_a_multilabel_model_names_every_label_above_its_threshold_on_the_page():
    from tlkit.demo import _classify_upload, _shown

    tuner = tiny_tuner(CLASSES)
    tuner.head = tuner.head.model_copy(update={"multilabel": True})  # sigmoid outputs, as a multi-label run's
    photo = sorted((SAMPLE / "glass").iterdir())[0]
    tuner.thresholds = [0.0, 1.5, 0.0]  # sigmoid outputs: always at or above 0, never at 1.5
    shown = _shown(lambda: _classify_upload(tuner, str(photo), photo.name, "none", 2**24, ValueError), str(photo))
    assert set(shown[1]) == set(CLASSES)
    assert shown[2].startswith("**Labels:** cardboard, metal (")
    tuner.thresholds = [1.5, 1.5, 1.5]
    shown = _shown(lambda: _classify_upload(tuner, str(photo), photo.name, "none", 2**24, ValueError), str(photo))
    assert shown[2].startswith("**No label**")
    tuner.thresholds = None  # none stored (a new head): predict decides at 0.5, and the page says so
    shown = _shown(lambda: _classify_upload(tuner, str(photo), photo.name, "none", 2**24, ValueError), str(photo))
    above = [c for c, p in shown[1].items() if p >= 0.5]
    assert "0.5 (this model stores no thresholds)" in shown[2]
    assert shown[2].startswith(f"**Labels:** {', '.join(above)} (" if above else "**No label**")
