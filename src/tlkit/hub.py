"""Plain-timm model folders: what ``timm.create_model("local-dir:PATH")`` and ``hf-hub:`` load.

`save_pretrained` writes ``config.json`` (architecture, ``num_classes``, ``label_names``, the
data config as ``pretrained_cfg``, the ``model_args`` such as ``pad_type``),
``model.safetensors`` with timm's ``save_for_hf``, and a ``README.md`` model card, the layout the Hugging Face hub serves, so a
fine-tuned model is shared the way the field shares timm models and needs no tlkit to run.
`load_pretrained` reads such a folder back; `push_to_hub` uploads one.

A folder from someone else is untrusted: `load_pretrained` reads only ``config.json`` (size-
limited JSON, fields checked against the same bounds as a tlkit checkpoint header) and
``model.safetensors`` (no pickle), and builds the model itself rather than letting the file
choose what runs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from torch import nn

from tlkit._fs import atomic_write_bytes, replace_folder, temp_sibling
from tlkit._introspect import classifier_module_names
from tlkit.backbone import DATA_CONFIG_KEYS
from tlkit.head import TaskHead
from tlkit.lora import has_lora, merged_copy

if TYPE_CHECKING:
    from tlkit._protocols import Run

__all__ = ["check_timm_folder", "load_pretrained", "push_to_hub", "save_pretrained", "timm_state_dict"]

_MAX_CONFIG_BYTES = 1 << 20


def timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights under plain timm's names: a dropout-only `TaskHead` becomes its Linear.

    Raises:
        ValueError: a head with a hidden layer (plain timm has no such head; export ONNX instead).
    """
    if has_lora(model):  # adapters folded into their linears: plain timm has none
        model = merged_copy(model)
    state = model.state_dict()
    for name in classifier_module_names(model):
        head = model.get_submodule(name)
        if not isinstance(head, TaskHead):
            continue
        if hasattr(head, "hidden"):
            raise ValueError(f"{name}: a head with a hidden layer cannot be a plain timm classifier; "
                             "export it with --format onnx or torch-export instead")
        for key in ("weight", "bias"):  # dropout is the identity at inference
            state[f"{name}.{key}"] = state.pop(f"{name}.fc.{key}")
    return state


def _plain_timm_model(tuner: Run) -> nn.Module:
    """A fresh timm model with the tuner's weights and ``num_classes``; checked to give the same logits."""
    kwargs = dict(tuner.backbone.model_kwargs)
    plain = timm.create_model(tuner.backbone.name, pretrained=False, num_classes=len(tuner.classes), **kwargs)
    target = plain.state_dict()
    state = {k: v.reshape(target[k].shape) if k in target else v for k, v in timm_state_dict(tuner.model).items()}
    plain.load_state_dict(state, strict=True)
    plain.eval()
    source = merged_copy(tuner.model).float().eval().cpu()
    x = torch.randn(2, *tuner.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.allclose(plain(x), source(x), rtol=1e-4, atol=1e-4):
            raise ValueError(f"{tuner.backbone.name}: the plain timm model does not reproduce the fine-tuned "
                             "logits (a head timm cannot build); export it with --format onnx instead")
    return plain


def save_pretrained(tuner: Run, path: str | Path) -> Path:
    """Write ``tuner``'s model as a plain timm folder that ``timm.create_model("local-dir:PATH")`` loads.

    Args:
        tuner: a trained `FineTuner` (its model, classes, data config and backbone kwargs).
        path: the folder; ``config.json``, ``model.safetensors`` and ``README.md`` are written into a
            new folder beside it that then replaces ``path`` as one unit (an old folder there is
            removed).

    Returns:
        The folder.

    Raises:
        ValueError: the head cannot be a plain timm classifier (a hidden layer), or the plain
            model's logits differ from the fine-tuned model's on a random input.
    """
    path = Path(path)
    plain = _plain_timm_model(tuner)
    source = tuner.metadata()["backbone"]["weights_source"]
    # Not timm's tag of the architecture's default weights (mobilenetv2_100 says "ra_in1k"): these
    # are fine-tuned weights, from the base weights the checkpoint names.
    plain.pretrained_cfg = {k: v for k, v in plain.pretrained_cfg.items() if k not in _BASE_WEIGHTS_KEYS}
    plain.pretrained_cfg.update(tag="tlkit_ft", notes=[f"fine-tuned with tlkit from {source}"])
    data = {k: tuner.data_config[k] for k in DATA_CONFIG_KEYS if k in tuner.data_config}
    data["input_size"] = tuple(data["input_size"])
    # Written whole into a new folder beside it, then swapped in: a kill never leaves new weights
    # under the old label_names (tlkit._fs.replace_folder).
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = temp_sibling(path)
    stage.mkdir(mode=0o777 & ~_umask())
    try:
        timm.models.save_for_hf(plain, str(stage), model_config={"label_names": list(tuner.classes)},
                                model_args=dict(tuner.backbone.model_kwargs), data_config=data,
                                safe_serialization=True)
        # safetensors writes its file 0600; a shared model is as readable as its config.json.
        (stage / "model.safetensors").chmod(0o666 & ~_umask())
        atomic_write_bytes(stage / "README.md", _model_card(tuner, source).encode("utf-8"))
        replace_folder(stage, path)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return path


_BASE_WEIGHTS_KEYS = {"tag", "hf_hub_id", "hf_hub_filename", "url", "file", "origin_url", "paper_ids", "paper_name",
                      "notes", "source"}


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _model_card(tuner: Run, source: str) -> str:
    """The folder's README.md: a hub model card (front matter for the hub, then the facts to use it)."""
    from tlkit._text import markdown_text
    from tlkit._version import __version__

    name = tuner.backbone.name
    metrics = (tuner.checkpoint_metadata or {}).get("metrics") or {}
    shown = {k: metrics[k] for k in ("top1", "macro_f1") if isinstance(metrics.get(k), (int, float))}
    dc = tuner.data_config
    lines = ["---", "library_name: timm", "tags:", "- image-classification", "- timm", "- tlkit", "---", "",
             f"# {markdown_text(name)} fine-tuned with tlkit for {len(tuner.classes)} classes", "",
             f"- Classes (index order): {', '.join(markdown_text(c) for c in tuner.classes)}",
             f"- Base weights: {markdown_text(source)}; model kwargs `{json.dumps(tuner.backbone.model_kwargs)}`",
             f"- Input: RGB {tuple(dc['input_size'])}, mean {dc['mean']}, std {dc['std']}, "
             f"{dc['interpolation']} resize, crop_pct {dc['crop_pct']}, crop_mode {dc.get('crop_mode', 'center')}",
             f"- Trained with tlkit {__version__}" + (f"; validation {', '.join(f'{k} {v:.3f}' for k, v in shown.items())}"
                                                     if shown else ""), "",
             "```python", "import timm", "model = timm.create_model('hf-hub:REPO_ID', pretrained=True)  # or 'local-dir:PATH'",
             "data = timm.data.resolve_data_config({}, model=model)", "```", ""]
    return "\n".join(lines)


_MAX_JSON_DEPTH = 32


def _json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``text`` (strings skipped), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _regular_file(file: Path) -> Path:
    """``file`` if it is a regular file in its folder; a link (even to a file) is refused by name."""
    if file.is_symlink():
        raise ValueError(f"{file}: is a symbolic link; a model folder's files are read only from the folder itself")
    if not file.is_file():
        raise ValueError(f"{file}: missing; not a timm model folder")
    return file


def _read_config(path: Path) -> dict[str, Any]:
    file = _regular_file(path / "config.json")
    if file.stat().st_size > _MAX_CONFIG_BYTES:
        raise ValueError(f"{file}: larger than {_MAX_CONFIG_BYTES} bytes; not a timm model config")
    try:
        text = file.read_text(encoding="utf-8")
        if _json_depth(text) > _MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {_MAX_JSON_DEPTH} levels")
        config = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{file}: not a timm model config ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: not a timm model config (a JSON object)")
    return config


def _class_names(names: Any, file: Path) -> list[str]:
    """``label_names`` checked as a checkpoint's class names are: 2 to 100,000 unique, printable, short."""
    from pydantic import TypeAdapter, ValidationError

    from tlkit._header import Text
    from tlkit.config import MAX_CLASSES

    if not (isinstance(names, list) and 2 <= len(names) <= MAX_CLASSES):
        raise ValueError(f"{file}: label_names must list the class names (at least 2 strings, at most {MAX_CLASSES})")
    try:
        names = TypeAdapter(list[Text]).validate_python(names, strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"{file}: label_names[{err['loc'][0]}]: {err['msg']}") from None
    seen: set[str] = set()
    dup = next((n for n in names if n in seen or seen.add(n)), None)
    if dup is not None:
        raise ValueError(f"{file}: label_names holds {dup!r} twice: its probability would be dropped")
    return names


def _model_args(config: dict[str, Any], n: int, file: Path) -> dict[str, Any]:
    """``model_args`` within the bounds a checkpoint's kwargs have (`tlkit._header.ModelKwargs`)."""
    from pydantic import ValidationError

    from tlkit._header import MODEL_KWARGS, ModelKwargs

    kwargs = config.get("model_args") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{file}: model_args must be a mapping")
    kwargs = dict(kwargs)
    # timm records the build's own arguments too: they must agree with the rest of the file.
    if kwargs.pop("num_classes", n) != n or kwargs.pop("in_chans", 3) != 3:
        raise ValueError(f"{file}: model_args num_classes must equal the {n} label_names, in_chans 3")
    unknown = sorted(set(kwargs) - set(MODEL_KWARGS))
    if unknown:
        raise ValueError(f"{file}: model_args {unknown} are not allowed; a folder may set only {sorted(MODEL_KWARGS)}")
    try:
        return ModelKwargs.model_validate(kwargs).as_kwargs()
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"{file}: model_args.{err['loc'][0]}: {err['msg']} (got {str(err.get('input'))[:40]})") from None


def _data_config(config: dict[str, Any], file: Path) -> dict[str, Any]:
    from tlkit._header import MAX_SIDE
    from tlkit.config import DataConfigOverrides

    cfg = config.get("pretrained_cfg") or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: pretrained_cfg must be a mapping")
    data = DataConfigOverrides.model_validate({k: cfg[k] for k in DATA_CONFIG_KEYS if cfg.get(k) is not None})
    if data.input_size is not None and max(data.input_size[1:]) > MAX_SIDE:  # as in a checkpoint header
        raise ValueError(f"{file}: pretrained_cfg.input_size {list(data.input_size)} has a side over {MAX_SIDE}")
    return data.model_dump(exclude_none=True)


def _checked(config: dict[str, Any], file: Path) -> tuple[str, list[str], dict[str, Any], dict[str, Any]]:
    """Architecture, class names, model kwargs and data config of a folder's config.json, within bounds."""
    arch = config.get("architecture")
    if not isinstance(arch, str) or not re.fullmatch(r"[a-z0-9_]{1,128}", arch) or not timm.is_model(arch):
        raise ValueError(f"{file}: architecture {str(arch)[:60]!r} is not a timm model name")
    names = _class_names(config.get("label_names"), file)
    if config.get("num_classes") != len(names):
        raise ValueError(f"{file}: num_classes {config.get('num_classes')!r} differs from the {len(names)} label_names")
    return arch, names, _model_args(config, len(names), file), _data_config(config, file)


def _check_fits_on_meta(arch: str, n: int, kwargs: dict[str, Any], weights: Path) -> None:
    """The model config.json describes, built on the ``meta`` device, must have exactly the file's
    tensor names and shapes (read from the safetensors header, no tensor loaded): a 563-byte
    config naming a 6.9 GiB architecture is refused before any memory is allocated."""
    from safetensors import safe_open

    from tlkit._meta_check import build_on_meta
    from tlkit.checkpoint import CheckpointError, check_tensors_match

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a damaged or hostile header
        raise ValueError(f"{weights}: not a readable safetensors file ({type(e).__name__})") from None
    try:
        model = build_on_meta(lambda: timm.create_model(arch, pretrained=False, num_classes=n, **kwargs))
    except Exception as e:  # noqa: BLE001 - whatever timm raises, the folder is what is wrong
        raise ValueError(f"{weights.parent / 'config.json'}: {arch} does not build with {kwargs} "
                         f"({type(e).__name__})") from None
    file = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    try:
        check_tensors_match(model.state_dict(), file, weights)
    except CheckpointError as e:
        raise ValueError(str(e)) from None


def load_pretrained(path: str | Path) -> tuple[nn.Module, list[str], dict[str, Any], dict[str, Any]]:
    """Read a plain timm folder (`save_pretrained`, or any ``config.json`` + ``model.safetensors``).

    The folder is untrusted: ``config.json`` is at most 1 MiB and 32 levels deep; its values are
    bounded as a checkpoint header's are (`tlkit._header`: allowed ``model_args`` and their
    values, input sides up to 2048, class names unique, printable and short); both files must
    be regular files of the folder (no links out); and the model it describes is built on the
    ``meta`` device and compared with the weights file's tensor shapes before any real memory
    is allocated.

    Returns:
        ``(model, classes, model_kwargs, data_config_overrides)``: the model in eval mode on the
        CPU with the folder's weights; the class names from ``label_names``.

    Raises:
        ValueError: a missing, linked or malformed file, a value out of bounds, weights that
            do not fit (names the file).
    """
    from safetensors.torch import load_file

    path = Path(path)
    arch, classes, kwargs, data = _checked(_read_config(path), path / "config.json")
    weights = path / "model.safetensors"
    if not weights.exists() and not weights.is_symlink():
        raise ValueError(f"{weights}: missing (only safetensors weights are read, never pickle files)")
    _check_fits_on_meta(arch, len(classes), kwargs, _regular_file(weights))
    model = timm.create_model(arch, pretrained=False, num_classes=len(classes), **kwargs)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{weights}: does not fit {arch} with {len(classes)} classes: {str(e).splitlines()[0]}") from None
    return model.eval(), classes, kwargs, data


def check_timm_folder(path: str | Path, model: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute logit difference between plain timm's ``local-dir:`` model and ``model`` on ``x``."""
    from tlkit.export import logit_gap

    return logit_gap(model, x, timm.create_model(f"local-dir:{Path(path)}", pretrained=True).eval())


def push_to_hub(tuner: Run, repo_id: str, *, token: str | None = None, private: bool = True) -> str:
    """Upload `save_pretrained`'s folder (weights, ``config.json`` and its ``README.md`` model card) to the
    Hugging Face hub (needs ``huggingface_hub`` and a token).

    Returns:
        The URL of the commit.

    Raises:
        ImportError: ``huggingface_hub`` is not installed.
    """
    import tempfile

    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError('push_to_hub needs huggingface_hub: pip install huggingface_hub') from None
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(tuner, folder)
        return str(api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="tlkit save_pretrained"))
