"""The web demo: served by Gradio, driven end to end in headless Chromium.

Browser tests skip when Chromium or Playwright is missing, unless ``TLKIT_BROWSER_TESTS=required``
(CI sets it), which turns the skip into a failure.
"""

import os
import shutil
import sys

import pytest

from conftest import SAMPLE, tiny_tuner
from tlkit import FineTuner
from tlkit.cli import main

gr = pytest.importorskip("gradio")
from tlkit.demo import build_demo, launch_demo  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium on a closed network: no background connections, no sandbox (CI runs as root).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
CLASSES = ["cardboard", "glass", "metal"]


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
def served(tmp_path_factory):
    """A tiny trained-from-scratch model, saved, loaded back as the CLI would, and served."""
    tuner = tiny_tuner(CLASSES)
    ckpt = tuner.save(tmp_path_factory.mktemp("demo") / "model.safetensors", metrics={"top1": 0.5, "epoch": 0})
    loaded = FineTuner.load(ckpt, device="cpu", progress=False)
    demo = launch_demo(loaded, port=None, block=False, quiet=True)
    yield loaded, demo
    demo.close()


def test_api_endpoint_returns_predict_probabilities(served):
    from gradio_client import Client, handle_file

    tuner, demo = served
    photo = sorted((SAMPLE / "metal").iterdir())[0]
    _, out = Client(demo.local_url, verbose=False).predict(handle_file(str(photo)), api_name="/classify")
    expected = tuner.predict(photo)[0]
    assert out["label"] == expected.label
    shown = {c["label"]: c["confidence"] for c in out["confidences"]}
    assert list(shown) == sorted(expected.probabilities, key=expected.probabilities.get, reverse=True)
    assert shown == pytest.approx(expected.probabilities, abs=1e-6)


def test_api_endpoint_names_a_bad_file(served, tmp_path):
    from gradio_client import Client, handle_file

    _, demo = served
    bad = tmp_path / "broken.jpg"
    bad.write_bytes((SAMPLE / "glass" / sorted(os.listdir(SAMPLE / "glass"))[0]).read_bytes()[:300])
    with pytest.raises(Exception, match="broken.jpg"):
        Client(demo.local_url, verbose=False).predict(handle_file(str(bad)), api_name="/classify")


def test_page_shows_the_predicted_label_in_chromium(served, tmp_path):
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


def test_build_demo_rejects_bad_arguments(served):
    tuner, _ = served
    with pytest.raises(ValueError, match="top_k"):
        build_demo(tuner, top_k=0)
    with pytest.raises(ValueError, match="tta"):
        build_demo(tuner, tta="rotate")


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
    for flag in ("--checkpoint", "--host", "--port", "--top-k", "--tta", "--device", "--share"):
        assert flag in out
