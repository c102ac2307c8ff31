"""Serve ``tlkit demo`` for a checkpoint, upload a photo in headless Chromium and save a screenshot.

This is how ``docs/images/demo.png`` is made::

    python examples/garbage/demo_screenshot.py --checkpoint runs/garbage-linear-probe \\
        --photo examples/garbage/data/glass/glass114.jpg --output docs/images/demo.png

Needs ``pip install "tlkit[demo]" playwright`` and Debian's ``chromium`` package.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tlkit import FineTuner
from tlkit.demo import launch_demo

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint or a run folder")
    parser.add_argument("--photo", required=True, type=Path, help="the photo to upload")
    parser.add_argument("--output", default=Path("demo.png"), type=Path, help="screenshot PNG to write")
    parser.add_argument("--examples", type=Path, default=Path(__file__).resolve().parent / "data",
                        help="folder with one sub-folder per class: its first photo of each is an example thumbnail")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    tuner = FineTuner.load(args.checkpoint, progress=False)
    expected = tuner.predict(args.photo)[0]
    examples = [sorted(p for p in folder.iterdir() if p.is_file())[0]
                for folder in sorted(args.examples.iterdir()) if folder.is_dir()]
    demo = launch_demo(tuner, block=False, quiet=True, examples=examples)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(demo.local_url)
            page.locator("input[type=file]").set_input_files(str(args.photo))
            label = page.get_by_test_id("label-output-value")
            label.wait_for(timeout=120_000)
            page.wait_for_timeout(500)  # let the preview image finish painting
            shown = label.inner_text().strip()
            args.output.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.output), full_page=True)
            browser.close()
    finally:
        demo.close()
    print(f"page shows {shown!r}, predict says {expected.label!r} ({expected.probability:.1%}); wrote {args.output}")
    if shown != expected.label:
        raise SystemExit("the page and predict disagree")


if __name__ == "__main__":
    main()
