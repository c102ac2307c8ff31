"""Argument types and helpers shared by the ``tlkit`` commands: devices, overrides, file lists, a run's recorded data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tlkit._text import escape_control

CALIBRATION_IMAGES = 128  # = tlkit.quantize.CALIBRATION_IMAGES (a test keeps them equal; that module imports torch)


def _count(least: int):
    """An argparse type: a whole number >= ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= {least}")
        return value
    return parse


def _parse_override(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE (e.g. train.epochs=5), got {text!r}")
    return text


def _device_arg(text: str) -> str:
    from tlkit.config import check_device

    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _require_device(device: str, what: str = "--device") -> None:
    """Fail now, with the reason, if ``device`` names hardware this machine lacks.

    ``what`` (the option or config field) starts the message.

    Raises:
        ValueError: CUDA or MPS asked for but not available, or a GPU index past the last GPU.
    """
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{what}: {device!r} but no CUDA GPU is available here; use 'cpu' or 'auto'")
        if index and int(index) >= count:
            raise ValueError(f"{what}: {device!r} but this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{what}: {device!r} but Apple MPS is not available here; use 'cpu' or 'auto'")


def _expand(patterns: list[str]) -> list[Path]:
    """Files named by paths, folders or globs (`tlkit.images.expand_image_paths`)."""
    from tlkit.images import expand_image_paths

    return expand_image_paths(patterns)


def _spread(files: list[Path], n: int) -> list[Path]:
    """``n`` files evenly spaced through ``files`` (sorted by class folder, so every class is sampled)."""
    return files if len(files) <= n else [files[i * len(files) // n] for i in range(n)]


def _run_config_file(checkpoint: Path | str) -> Path:
    """The ``config.yaml`` of a checkpoint's run: in the run folder given, or beside the checkpoint file."""
    checkpoint = Path(checkpoint)
    return (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.yaml"


def _recorded_data(checkpoint: Path | str, option: str):
    """The `DatasetConfig` a run recorded in its ``config.yaml``, if this user account's tlkit wrote it.

    A run folder may come from anyone, and its ``config.yaml`` names folders of the machine that
    trained it: they are read only for a run this account trained (`tlkit._origin`: the file
    carries this account's signature, unchanged since), and the folder read is said on stderr.

    Raises:
        FileNotFoundError: no ``config.yaml`` beside the checkpoint.
        ValueError: a run folder from elsewhere (or an edited ``config.yaml``); the message names
            ``option``'s alternative.
    """
    from tlkit import RunConfig
    from tlkit._origin import is_own_run

    config_file = _run_config_file(checkpoint)
    if not config_file.is_file():
        raise FileNotFoundError(f"{option}: no {config_file}: the run's split is recorded there; "
                                f"pass {_INSTEAD[option]} instead")
    if not is_own_run(config_file.parent):
        raise ValueError(f"{option}: {config_file} was not written by tlkit under this user account (a run folder "
                         f"from elsewhere, or an edited config), so the data folder it names is not read; "
                         f"pass {_INSTEAD[option]}")
    data = RunConfig.from_file(config_file).data
    source = data.labels if data.labels is not None else data.root  # a label table names the images itself
    print(f"tlkit: reading {escape_control(str(source))} as recorded in {config_file}", file=sys.stderr)
    return data


_INSTEAD = {"--split val": "--data FOLDER", "--format onnx-int8": "--calibration FOLDER (photos like the training ones)",
            "demo examples": "--examples FOLDER"}


def _recorded_split(checkpoint: Path, classes: list[str], name: str = "val"):
    """A split (``val``, or a label table's ``test`` rows) a run recorded in its ``config.yaml``
    (next to the checkpoint, or in the run folder)."""
    from tlkit.datasets import load_split

    config_file = _run_config_file(checkpoint)
    data = load_split(_recorded_data(checkpoint, "--split val"), name)
    if data.classes != classes:
        raise ValueError(f"--split {name}: {config_file} names classes {data.classes}, the checkpoint {classes}")
    return data


def _option_files(option: str, where: Path | str) -> list[Path]:
    """The image files an option names (a folder, file or glob; see `_expand`); a missing path is an error.

    Raises:
        FileNotFoundError: ``where`` neither exists nor is a glob; the message names ``option``.
    """
    import glob

    if not (glob.has_magic(str(where)) or Path(where).exists()):
        raise FileNotFoundError(f"{option} {where}: no such folder, file or glob match")
    return _expand([str(where)])


def _offline_weights(name: str) -> str:
    """Where weights for ``name`` can be had without network, or ``""``."""
    from tlkit.pretrained import hub_cache_file, local_weights

    local = local_weights(name)
    if local is not None:
        return f"file ({local[1].source}): {local[0]}"
    cached = hub_cache_file(name)
    return f"hub cache: {cached}" if cached else ""

