"""Starting a run: from a `RunConfig` and its data to a trained run folder, one way for every entry point.

``tlkit train`` and ``examples/garbage/train.py`` both go through `prepare_run` and `fit_run`,
so both record the resolved config (`tlkit.resolve_run_config`), check the same things before
the run folder is touched, hold the same lock and end on Ctrl-C or SIGTERM with the same line
(`interrupted`)::

    config, tuner = prepare_run(config, train, val)
    try:
        fit_run(tuner, config, train, val)
    except KeyboardInterrupt as e:
        sys.exit(interrupted(e, tuner, "mytool", ["mytool", "--resume"]))
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tlkit import FineTuner
from tlkit._guard import claim_run_folder, run_guard
from tlkit._origin import sign_run_config
from tlkit._signals import exit_status
from tlkit._text import escape_control
from tlkit.backbone import resolve_run_config
from tlkit.callbacks import Callback
from tlkit.config import RunConfig
from tlkit.data import ImageFolderDataset
from tlkit.pretrained import describe_source
from tlkit.recipes import adapt_to_data

__all__ = ["check_before_writing", "check_resume_config", "describe_machine", "fit_run", "interrupted", "prepare_run",
           "record_config"]


def _flat(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_config(config: RunConfig) -> RunConfig:
    """The config of a resumed run: the run's recorded ``config.yaml`` must still describe it.

    Settings of this machine (``train.device``, ``num_workers``, ``progress``...) may differ, and
    ``train.epochs`` may grow (the run is extended and ``config.yaml`` rewritten); anything else
    that differs is refused, so the folder's config never lies about its checkpoints.

    Raises:
        ValueError: no ``output_dir`` (which run?), or changed settings (each named, old -> new).
    """
    from tlkit._header import RUNTIME_FIELDS

    if config.output_dir is None:
        raise ValueError("--resume needs the run folder: pass --config RUN/config.yaml (it records output_dir) "
                         "or --set output_dir=RUN")
    recorded_file = Path(config.output_dir) / "config.yaml"
    if not recorded_file.is_file():
        return config
    old, new = (_flat(c.model_dump(mode="json")) for c in (RunConfig.from_file(recorded_file), config))
    free = {f"train.{f}" for f in RUNTIME_FIELDS} | {"train.epochs"}
    changed = [k for k in sorted(set(old) | set(new)) if k not in free and old.get(k) != new.get(k)]
    if changed:
        listed = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:5])
        raise ValueError(f"{recorded_file}: --resume with changed settings: {listed}; resume with the recorded "
                         f"settings (--config {recorded_file}) or train a new run (another output_dir)")
    return config


def check_before_writing(tuner: FineTuner, train: Any, val: Any) -> None:
    """Run the checks `FineTuner.fit` would make only after the run folder exists.

    Every freeze phase leaves something to train and its patterns match; class weights fit
    the classes; every image is decoded once (fit skips datasets scanned here), bad files
    reported on stderr, or with ``bad_images="error"`` the scan raises.

    Raises:
        ValueError: as `FreezePolicy.trainable_names`, `FineTuner.class_weights`, or
            `ImageFolderDataset.scan` (`BadImageError` is a ValueError).
    """
    tuner.policy.check_epochs(tuner.config.epochs)
    for epoch in [0, *tuner.policy.boundaries()]:
        tuner.policy.trainable_names(tuner.model, epoch)
    tuner.class_weights(train)
    for data in (train, val):
        if isinstance(data, ImageFolderDataset) and data.scan_report is None:
            report = data.scan()
            if (report.bad or report.ignored) and tuner.is_main:
                print(escape_control(report.summary(), keep="\n"), file=sys.stderr)


def record_config(tuner: FineTuner, config: RunConfig, resume: bool) -> None:
    """Write ``config.yaml`` for a new run; on resume only when ``train.epochs`` changed (else it stays)."""
    path = Path(config.output_dir) / "config.yaml"
    if not tuner.is_main:
        return
    if resume and path.is_file() and RunConfig.from_file(path).train.epochs == config.train.epochs:
        return
    config.to_file(path)
    sign_run_config(config.output_dir)  # marks the run as this account's (tlkit._origin)


def prepare_run(config: RunConfig, train: Any, val: Any = None, *, resume: bool = False,
                callbacks: Sequence[Callback] | None = None) -> tuple[RunConfig, FineTuner]:
    """Resolve ``config``, build its `FineTuner` and check everything that can fail before a file is written.

    Args:
        config: the run's settings; the backbone is resolved here (`tlkit.resolve_run_config`),
            and without ``output_dir`` a new run folder is chosen (`RunConfig.with_run_dir`).
        train: the training data (its ``classes`` name the head's outputs).
        val: the validation data, or ``None``.
        resume: the run continues from its folder: the recorded config must still describe it
            (`check_resume_config`).
        callbacks: passed to `FineTuner.from_config`.

    Returns:
        ``(config, tuner)``: the resolved config the run records, and the tuner built from it.

    Raises:
        ValueError, FileNotFoundError, HubDownloadError: as `tlkit.resolve_backbone`,
            `check_resume_config` and `check_before_writing`.
    """
    config = adapt_to_data(resolve_run_config(config), train)  # the auto recipe's choices, recorded
    if getattr(train, "multilabel", False) and not config.head.multilabel:  # a multi-label table: sigmoid head
        config = config.model_copy(update={"head": config.head.model_copy(update={"multilabel": True})})
    config = check_resume_config(config) if resume else config.with_run_dir()
    tuner = FineTuner.from_config(config, train.classes, callbacks)  # under torchrun: joins the process group
    check_before_writing(tuner, train, val)
    return config, tuner


def fit_run(tuner: FineTuner, config: RunConfig, train: Any, val: Any = None, *, resume: bool = False,
            overwrite: bool = False, announce: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Take the run folder, record ``config.yaml`` and fit: the run-folder lock comes first, so a
    second run never overwrites the first one's config.

    Args:
        announce: once the folder is taken (on the main process), called with one line each:
            where the backbone's weights come from, and the run folder.

    Returns:
        `FineTuner.fit`'s history.

    Raises:
        KeyboardInterrupt: Ctrl-C, or SIGTERM (`TrainingInterrupted`); see `interrupted`.
        RunExistsError, RunLockedError, OutputDirError: as `FineTuner.fit`, before anything is written.
    """
    with run_guard(tuner):
        claim_run_folder(tuner, resume=resume, overwrite=overwrite)
        record_config(tuner, config, resume)
        if announce is not None and tuner.is_main:
            announce(f"machine {describe_machine(tuner)}")
            announce(f"backbone {describe_source(config.backbone)}")
            announce(f"run folder {config.output_dir}" + (" (resumed)" if resume else ""))
        # The folder was claimed (and, with overwrite, emptied) above: fit must not delete the config just recorded.
        return tuner.fit(train, val, resume=resume)


def describe_machine(tuner: FineTuner) -> str:
    """One line: the CPU, the features that decide tlkit's path (AVX2, AVX512, BF16, VNNI, AMX) and that path."""
    import torch

    from tlkit._cpu import cpu_features, cpu_name

    feats = [k.upper() for k, v in cpu_features().items() if v and k in ("avx2", "avx512", "bf16", "vnni", "amx")]
    gpu = torch.cuda.get_device_name(tuner.device) if tuner.device.type == "cuda" else None
    amp = str(tuner.amp_dtype).removeprefix("torch.") if tuner.amp_dtype else "fp32"
    return (f"{gpu or cpu_name()}" + (f" ({' '.join(feats)})" if feats and not gpu else "")
            + f", device {tuner.device}, precision {amp}, channels_last {'on' if tuner.channels_last else 'off'}, "
            f"{torch.get_num_threads()} threads")


def interrupted(error: KeyboardInterrupt, tuner: FineTuner, prog: str, again: Sequence[str]) -> int:
    """Say on stderr (one line) what Ctrl-C or SIGTERM left behind and how to continue.

    Args:
        error: the interrupt `fit_run` raised.
        tuner: the run's tuner.
        prog: what starts the line (``"tlkit train"``).
        again: the command that resumes the run.

    Returns:
        The exit status for the process: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
    """
    status = exit_status(error)
    if tuner.is_main:
        name = "SIGTERM" if status == 143 else "Ctrl-C"
        done = (f"{tuner.output_dir} keeps the files of epoch {tuner.epoch}" if tuner.epoch
                else "no epoch had finished, nothing was saved")
        print(f"{prog}: interrupted by {name}; {done}; continue with: {shlex.join(again)}", file=sys.stderr)
    return status
