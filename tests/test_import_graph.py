"""The package's import graph: no cycles, the core never imports the façade or the package root."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tlkit"
# Layers above the façade may use FineTuner; nothing below it may.
ABOVE_FACADE = {"tlkit.cli", "tlkit.__main__", "tlkit.protocol", "tlkit.demo", "tlkit.run", "tlkit"}


def _above_facade(module: str) -> bool:
    """The layers above the façade, the command line's modules (``tlkit.cli.*``) included."""
    return module in ABOVE_FACADE or module.startswith("tlkit.cli.")


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """tlkit modules imported anywhere in the file, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
            for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tlkit":
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "tlkit"}
    return out


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in SRC.rglob("*.py")}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for dep in graph.get(m, ()):
            if dep not in graph:
                continue
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_core_imports_neither_the_facade_nor_the_package_root():
    for module, deps in _graph().items():
        if _above_facade(module) or module == "tlkit.finetuner":
            continue
        assert "tlkit.finetuner" not in deps, f"{module} imports tlkit.finetuner"
        assert "tlkit" not in deps, f"{module} imports the package root"


def _all_imports(path: Path) -> set[str]:
    """tlkit modules imported anywhere in the file, ``if TYPE_CHECKING:`` blocks included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tlkit":
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "tlkit"}
    return out


def test_no_module_but_the_facade_and_the_root_names_the_facade_module():
    # Not even for type checkers: the core and callbacks type against tlkit._protocols.Run.
    for path in SRC.rglob("*.py"):
        if _module(path) in {"tlkit.finetuner", "tlkit"}:
            continue
        text = path.read_text()
        assert "tlkit.finetuner" not in text, f"{path.name} names tlkit.finetuner"
        assert "tlkit.finetuner" not in _all_imports(path), path.name


def test_public_modules_never_import_the_training_core():
    # Public modules (no leading underscore) reach the loop only through the façade; the pieces
    # they share with it (run files, signals, runtime, loaders, RNG) are private top-level modules.
    # The command line's modules are private by name but are the CLI users run: checked too.
    for path in [*SRC.glob("*.py"), *(SRC / "cli").glob("*.py")]:
        module = _module(path)
        if module in {"tlkit.finetuner", "tlkit"} or (path.name.startswith("_") and path.parent == SRC):
            continue
        bad = sorted(d for d in _all_imports(path) if d == "tlkit._training" or d.startswith("tlkit._training."))
        assert not bad, f"{module} imports {bad}"


def test_leaf_modules_import_alone():
    leaves = ["tlkit._introspect", "tlkit.schedule", "tlkit.config", "tlkit.callbacks", "tlkit._training.loop"]
    # Each in a fresh interpreter (an order-dependent import would fail there), all at once.
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for m in leaves}
    for m, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{m}: {err[-800:]}"
