"""Every Python snippet in the README and the docs runs, in page order, as a reader would run it.

A block preceded by an HTML comment ``<!-- skip-test: reason -->`` (invisible in the rendered
docs) is skipped, for code that needs the network, a GPU or data the reader brings. Snippets run
in a temporary working folder where ``examples`` links to the repository's, so ``runs/`` and
every other file they write stay out of the repository.
"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- skip-test[^>]*-->\s*)?```python\n(.*?)```", re.DOTALL)

# Names a page's snippets use without defining them, as the page's text explains.
PRELUDE = {
    "docs/recipes.md": """
import timm
from tlkit import FineTuner, HeadReplacer, ImageFolderDataset, TrainConfig, stratified_split
train, val = stratified_split(ImageFolderDataset("examples/garbage/data"), 0.2, 0)
model = HeadReplacer(len(train.classes)).apply(timm.create_model("test_resnet"))
tuner = FineTuner(model, train.classes, config=TrainConfig(batch_size=16, progress=False),
                  data_config={"input_size": [3, 64, 64], "interpolation": "bilinear", "mean": [0.5] * 3,
                               "std": [0.5] * 3, "crop_pct": 0.875, "crop_mode": "center"})
""",
}


def snippets(page: str) -> list[tuple[int, str]]:
    text = (REPO / page).read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in BLOCK.finditer(text) if not m.group(1)]


@pytest.mark.parametrize("page", [p for p in PAGES if snippets(p)])
def test_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    namespace: dict = {"__name__": "__docs__"}
    if page in PRELUDE:
        exec(compile(PRELUDE[page], f"{page}:prelude", "exec"), namespace)
    for line, code in snippets(page):
        try:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page}, snippet at line {line} failed: {type(e).__name__}: {e}") from e


def test_skip_markers_give_a_reason():
    for page in PAGES:
        for m in re.finditer(r"<!-- skip-test(.*?)-->", (REPO / page).read_text()):
            assert m.group(1).strip(" :"), f"{page}: skip-test without a reason"


SHELL = re.compile(r"```(?:bash|sh|console)\n(.*?)```", re.DOTALL)


def _command_lines(page: str) -> list[tuple[int, str]]:
    """Each command of the page's shell blocks (continuation lines joined), with its line number."""
    text = (REPO / page).read_text()
    out = []
    for m in SHELL.finditer(text):
        first = text[: m.start()].count("\n") + 2
        joined, start = "", None
        for k, line in enumerate(m.group(1).splitlines()):
            start = first + k if not joined else start
            joined += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
            if not line.rstrip().endswith("\\"):
                out.append((start, joined.split("  #")[0].split(" # ")[0].strip()))
                joined = ""
    return out


def _parsers():
    import importlib.util

    from tlkit.cli import build_parser

    parsers = {("tlkit",): build_parser(), ("python", "-m", "tlkit"): build_parser()}
    for name in ("train", "protocol"):
        spec = importlib.util.spec_from_file_location(f"garbage_{name}", REPO / "examples" / "garbage" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        parsers[("python", f"examples/garbage/{name}.py")] = module.build_parser() if name == "train" else None
    return parsers


def test_every_documented_command_line_parses():
    """Issue 23: the commands the README and the docs give exist with the options they show.

    Synopsis lines (with ``[``, ``|`` or ``...`` placeholders) are skipped; every other ``tlkit``,
    ``python -m tlkit`` and ``python examples/garbage/train.py`` line must parse.
    """
    import shlex

    parsers, checked = _parsers(), 0
    for page in PAGES:
        for line, command in _command_lines(page):
            for part in command.split("&&"):
                words = shlex.split(part.strip()) if part.strip() else []
                prefix = next((p for p in parsers if tuple(words[: len(p)]) == p and parsers[p] is not None), None)
                if prefix is None or any(ch in part for ch in "[|") or "..." in part:
                    continue
                try:
                    parsers[prefix].parse_args(words[len(prefix):])
                except SystemExit as e:
                    if e.code:
                        raise AssertionError(f"{page}:{line}: {part.strip()!r} does not parse") from None
                checked += 1
    assert checked >= 40, checked
