"""Helper process for test_trust.py (not a test module): hostile run folders under an audit hook.

Usage: ``python trust_worker.py CASES.json RESULTS.json``. Each case is
``{"name": N, "action": A, "run": FOLDER, "argv": [...]}`` with action

- ``"load"``: ``FineTuner.load(run)``;
- ``"evaluate"``: load, then ``evaluate`` 8 random 64 x 64 images (DataLoader workers would fork);
- ``"cli"``: ``python -m tlkit ARGV`` in this process (``runpy``), standard error captured;
- ``"unsafe_torch_load"``: ``torch.load(run, weights_only=False)``, the control showing that the
  payload file is live and that the hook sees what it runs.

An audit hook (``sys.addaudithook``, installed after the heavy imports and never removable,
hence a process of its own) records every ``open`` (absolute path), every
``pickle.find_class`` and every process start while a case runs. RESULTS.json gets, per case:
the events, and the exception (type and message) or the CLI's exit status and standard error.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys

import torch

import tlkit.cli  # noqa: F401 - imported before the hook, like the rest of the library
from tlkit import FineTuner

EVENTS: list[list[str]] = []
PROCESS_EVENTS = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen"}


def _hook(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        EVENTS.append(["open", os.path.abspath(os.fsdecode(args[0]))])
    elif event == "pickle.find_class":
        EVENTS.append(["pickle", f"{args[0]}.{args[1]}"])
    elif event in PROCESS_EVENTS:
        EVENTS.append(["process", event])


def _run(case: dict) -> dict:
    out: dict = {}
    action = case["action"]
    if action == "load":
        FineTuner.load(case["run"], device="cpu")
    elif action == "evaluate":
        tuner = FineTuner.load(case["run"], device="cpu")
        data = torch.utils.data.TensorDataset(torch.randn(8, 3, 64, 64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
        tuner.evaluate(data)
        out["num_workers"] = tuner.config.num_workers
    elif action == "cli":
        err = io.StringIO()
        sys.argv = ["tlkit", *case["argv"]]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                runpy.run_module("tlkit", run_name="__main__", alter_sys=True)
            except SystemExit as e:
                out["exit"] = e.code
        out["stderr"] = err.getvalue()
    elif action == "unsafe_torch_load":
        torch.load(case["run"], weights_only=False)
    return out


def main() -> None:
    cases_file, results_file = sys.argv[1:3]  # the "cli" cases replace sys.argv
    with open(cases_file) as f:
        cases = json.load(f)
    results = {}
    sys.addaudithook(_hook)
    for case in cases:
        EVENTS.clear()
        try:
            out = _run(case)
        except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
            out = {"error": type(e).__name__, "message": str(e)}
        out["events"] = list(EVENTS)
        results[case["name"]] = out
    EVENTS.clear()
    with open(results_file, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
