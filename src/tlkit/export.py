"""Export a trained classifier to ONNX, ``torch.export`` or TorchScript, and check it against PyTorch.

Every export takes the model input of the checkpoint's data config, float32 ``(B, 3, H, W)``
normalised with its mean and std, and return logits ``(B, num_classes)`` (apply softmax for
probabilities). The batch dimension is dynamic. Preprocessing is not part of the graph: use
the same eval transform (`tlkit.create_transforms`, or the values in the checkpoint metadata).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlkit._fs import check_not_symlink, temp_sibling

__all__ = ["check_onnx", "check_torch_export", "check_torchscript", "export_onnx", "export_torch", "export_torchscript",
           "logit_gap", "set_onnx_metadata"]


def _example(model: nn.Module, input_size: tuple[int, int, int], batch: int = 2) -> torch.Tensor:
    param = next(model.parameters())
    return torch.randn(batch, *input_size, device=param.device, dtype=torch.float32)


def _plain_copy(model: nn.Module) -> nn.Module:
    # A float32, contiguous-format, eval-mode copy: exporters trace what they are given. LoRA
    # adapters are merged, so the file runs without peft and has plain timm's weight names.
    from tlkit.lora import merged_copy

    out = merged_copy(model).float().eval()
    return out.to(memory_format=torch.contiguous_format)


def _static_same_padding(model: nn.Module, input_size: tuple[int, int, int]) -> nn.Module:
    """``model`` (a copy, changed in place) with timm's dynamic TF-"same" convolutions padded statically.

    timm's ``Conv2dSame`` computes its padding from the input's shape on every call; traced, that
    is a chain of Shape/Gather/Ceil ops and a Pad fed by them, which onnxruntime can neither fold
    nor fuse into the convolution (in an INT8 graph the float Pad between Dequantize and
    Quantize cost a fifth of MobileNetV2's time at 448 x 336). The ONNX graph has a fixed H and
    W anyway, so each such conv gets the padding of the size it sees there: a constant
    ``ZeroPad2d`` (the same numbers ``timm.layers.pad_same`` computes), which onnxruntime fuses
    into the convolution's ``pads``.
    """
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    seen: dict[str, list[int]] = {}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv2dSame)}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, list(a[0].shape[-2:])))
             for n, m in convs.items()]
    with torch.no_grad():
        model(_example(model, input_size, batch=1))
    for h in hooks:
        h.remove()
    for name, conv in convs.items():
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                          conv.groups, conv.bias is not None)
        plain.load_state_dict(conv.state_dict())
        pads = pad_same_arg(seen[name], list(conv.kernel_size), list(conv.stride), list(conv.dilation))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Sequential(nn.ZeroPad2d(pads), plain))
    return model


def export_onnx(
    model: nn.Module, path: str | Path, input_size: tuple[int, int, int], *, opset: int = 17,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an ONNX file with a dynamic batch dimension.

    Uses ``torch.onnx.export`` (TorchScript-based exporter, ``dynamo=False``, which needs only
    the ``onnx`` package). Input ``"input"``: float32 ``(batch, 3, H, W)``; output
    ``"logits"``: float32 ``(batch, num_classes)``. ``metadata`` (class names, data config) is
    stored as the model's ``metadata_props`` (JSON strings).

    Args:
        model: the classifier (any device; exported from a float32 eval-mode copy on CPU).
        path: the ``.onnx`` file to write.
        input_size: ``(3, H, W)`` of the data config.
        opset: ONNX opset version.
        metadata: key -> JSON-serialisable value.

    Returns:
        ``path``.

    Raises:
        ImportError: the ``onnx`` package is missing (``pip install "tlkit[export]"``).
    """
    try:
        import onnx
    except ImportError as e:
        raise ImportError('ONNX export needs the onnx package: pip install "tlkit[export]"') from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # "export to runs/x/model.onnx" needs no mkdir first
    plain = _static_same_padding(_plain_copy(model).cpu(), tuple(input_size))
    x = _example(plain, tuple(input_size))
    check_not_symlink(path)
    tmp = temp_sibling(path)
    # The TorchScript-based exporter warns about its own deprecation and constant folding of
    # timm's shape arithmetic: nothing the user can act on (the parity check is what counts).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # only torch's exporter runs in this block
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            plain, (x,), str(tmp), input_names=["input"], output_names=["logits"], opset_version=opset,
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )
    proto = onnx.load(str(tmp))
    set_onnx_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


def set_onnx_metadata(proto: Any, metadata: dict[str, Any] | None) -> None:
    """Replace an ONNX ``ModelProto``'s ``metadata_props`` with ``metadata`` (values JSON-encoded)."""
    del proto.metadata_props[:]
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, json.dumps(v)


def logit_gap(model: nn.Module, x: torch.Tensor, run) -> float:
    """Largest absolute difference between ``run(x)`` (an exported model's logits) and ``model``'s.

    ``model`` runs as every export sees it (`_plain_copy`: float32, eval mode, LoRA merged, CPU).
    """
    plain = _plain_copy(model).cpu()
    x = x.float().cpu().contiguous()
    with torch.no_grad():
        return float((torch.as_tensor(run(x)) - plain(x)).abs().max())


@contextlib.contextmanager
def _quiet_jit():
    # torch 2.9+ deprecates torch.jit (FutureWarning on trace, trace_method, save and load): the
    # user asked for TorchScript, so the notice is not theirs to act on; `export_torch` is the successor.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


def check_onnx(path: str | Path, model: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute logit difference between onnxruntime and PyTorch on the batch ``x``.

    Args:
        path: an ONNX file from `export_onnx`.
        model: the PyTorch classifier it came from.
        x: float32 ``(B, 3, H, W)`` model input (e.g. real photos through the eval transform).

    Raises:
        ImportError: onnxruntime is missing (``pip install "tlkit[export]"``).
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError('checking an ONNX export needs onnxruntime: pip install "tlkit[export]"') from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return logit_gap(model, x, lambda x: torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0]))


def export_torchscript(model: nn.Module, path: str | Path, input_size: tuple[int, int, int],
                       metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a traced TorchScript file (``torch.jit.load`` reads it without tlkit).

    ``metadata`` is stored as the extra file ``tlkit.json`` inside the archive
    (``torch.jit.load(path, _extra_files={"tlkit.json": ""})``).

    Args:
        model: the classifier.
        path: the ``.pt`` file to write.
        input_size: ``(3, H, W)`` of the data config.
        metadata: key -> JSON-serialisable value.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = _plain_copy(model).cpu()
    check_not_symlink(path)
    tmp = temp_sibling(path)
    with _quiet_jit():
        with torch.no_grad():
            traced = torch.jit.trace(plain, _example(plain, tuple(input_size)))
        torch.jit.save(traced, str(tmp), _extra_files={"tlkit.json": json.dumps(metadata or {})})
    tmp.replace(path)
    return path


def export_torch(model: nn.Module, path: str | Path, input_size: tuple[int, int, int],
                 metadata: dict[str, Any] | None = None, max_batch: int = 1024) -> Path:
    """Write ``model`` as a ``torch.export`` ``ExportedProgram`` (``.pt2``) with a dynamic batch.

    ``torch.export.load(path).module()`` runs it without tlkit or timm. Input float32
    ``(batch, 3, H, W)``, 1 <= batch <= ``max_batch``; output logits ``(batch, num_classes)``.
    ``metadata`` is stored as the extra file ``tlkit.json``
    (``torch.export.load(path, extra_files={"tlkit.json": ""})``).

    Raises:
        torch._dynamo.exc.UserError (a ``RuntimeError``): the model cannot be exported with a
            dynamic batch (data-dependent control flow); the message says where.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = _plain_copy(model).cpu()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.export.export(plain, (_example(plain, tuple(input_size)),), dynamic_shapes=({0: batch},))
    check_not_symlink(path)
    tmp = temp_sibling(path, ".pt2")  # torch.export.save warns on another suffix
    torch.export.save(program, str(tmp), extra_files={"tlkit.json": json.dumps(metadata or {})})
    tmp.replace(path)
    return path


def check_torchscript(path: str | Path, model: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute logit difference between the saved TorchScript file and PyTorch on ``x``."""
    with _quiet_jit():
        loaded = torch.jit.load(str(path), map_location="cpu")
    return logit_gap(model, x, loaded)


def check_torch_export(path: str | Path, model: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute logit difference between the saved ``ExportedProgram`` and PyTorch on ``x``."""
    return logit_gap(model, x, torch.export.load(str(path)).module())
