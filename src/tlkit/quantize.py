"""INT8 ONNX for the edge: static quantisation with onnxruntime, and its check against float32.

The exported graph has the same interface as `tlkit.export.export_onnx` (input ``"input"``,
float32 ``(batch, 3, H, W)`` normalised with the data config; output ``"logits"``, float32
``(batch, num_classes)``); inside, weights are int8 per output channel and activations uint8,
in onnxruntime's QDQ format (QuantizeLinear/DequantizeLinear pairs that its CPU kernels fuse
into integer convolutions and matrix products). Activation ranges come from calibration photos
run through the float model (``CalibrationMethod.MinMax`` by default), as onnxruntime's
quantisation guide describes: https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html

uint8 activations with int8 weights (U8S8) is onnxruntime's recommended pairing on x86-64; on
CPUs without VNNI, ``reduce_range=True`` avoids the saturation its guide warns about.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tlkit._fs import check_not_symlink
from tlkit.export import export_onnx, set_onnx_metadata

__all__ = ["CALIBRATION_IMAGES", "activation_bytes", "available_memory", "calibration_cap", "compare_onnx",
           "export_onnx_int8", "images_per_second", "onnx_logits", "read_metadata"]

CALIBRATION_IMAGES = 128
"""Calibration photos `tlkit export --format onnx-int8` takes from the training folder by default."""
_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}  # -> onnxruntime CalibrationMethod
_CALIBRATION_BATCH = 8  # photos per calibration run (MobileNetV2's activations at 448 x 336: ~0.1 GB a photo)


def _ort():
    try:
        import onnxruntime
        import onnxruntime.quantization  # noqa: F401  (a submodule: imported for its side effect)
    except ImportError as e:
        raise ImportError('INT8 export needs onnx and onnxruntime: pip install "tlkit[export]"') from e
    return onnxruntime


def _reader(calibration: torch.Tensor, batch: int):
    """An onnxruntime ``CalibrationDataReader`` over ``calibration`` in batches of ``batch``."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._chunks = iter(calibration.float().cpu().contiguous().split(batch))

        def get_next(self):
            chunk = next(self._chunks, None)
            return None if chunk is None else {"input": chunk.numpy()}

    return _Batches()


def _with_metadata(target: Path, metadata: dict[str, Any] | None) -> None:
    # quantize_static rebuilds the graph and keeps no metadata_props: class names go back in.
    import onnx

    proto = onnx.load(str(target))
    set_onnx_metadata(proto, metadata)
    onnx.save(proto, str(target))


@contextlib.contextmanager
def _stdout_to_stderr():
    """onnxruntime's calibrators print progress to stdout; a command's stdout is its JSON: move it."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)  # native writes too
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def activation_bytes(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Bytes of float32 activations one photo produces in ``model`` (every module's output summed).

    What onnxruntime's histogram calibrators (percentile, entropy) keep for every calibration
    photo; measured with a forward pass of one photo on the ``meta`` device (no memory used).
    """
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(t, torch.Tensor):
                total += t.numel() * 4

    twin = _meta_copy(model)
    leaves = [m for m in twin.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            twin(torch.empty(1, *input_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


def _meta_copy(model: nn.Module) -> nn.Module:
    import copy

    twin = copy.deepcopy(model).float().eval()
    return twin.to_empty(device="meta") if hasattr(twin, "to_empty") else twin.to("meta")


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (Linux), else ``None``."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def calibration_cap(model: nn.Module, input_size: tuple[int, int, int], method: str,
                    memory: int | None = None) -> int | None:
    """The most calibration photos ``method`` can take within half of ``memory`` (default: the
    memory available now), or ``None`` when there is no bound (MinMax keeps two numbers per tensor
    and batch; the histogram methods keep every activation of every photo).
    """
    if method == "minmax":
        return None
    memory = available_memory() if memory is None else memory
    if memory is None:
        return None
    return max(0, int(memory * 0.5 // max(activation_bytes(model, input_size), 1)))


def _check_calibration(calibration: torch.Tensor, input_size: tuple[int, int, int], method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"method={method!r}: use one of {sorted(_METHODS)}")
    if calibration.ndim != 4 or len(calibration) == 0 or tuple(calibration.shape[1:]) != tuple(input_size):
        raise ValueError(f"calibration must be (N, {', '.join(map(str, input_size))}) with N >= 1, "
                         f"got {tuple(calibration.shape)}")


def export_onnx_int8(
    model: nn.Module, path: str | Path, input_size: tuple[int, int, int], calibration: torch.Tensor, *,
    metadata: dict[str, Any] | None = None, per_channel: bool = True, method: str = "minmax",
    reduce_range: bool = False, opset: int = 17, memory: int | None = None,
) -> Path:
    """Write ``model`` as a statically quantised INT8 ONNX file (dynamic batch).

    The float32 export (`tlkit.export.export_onnx`) goes through onnxruntime's
    ``quant_pre_process`` (shape inference, graph optimisation) and ``quantize_static``
    (QDQ format, int8 weights, uint8 activations). Nothing is written at ``path`` until the
    quantised file is complete.

    Args:
        model: the classifier (exported from a float32 eval-mode CPU copy).
        path: the ``.onnx`` file to write.
        input_size: ``(3, H, W)`` of the data config.
        calibration: float32 ``(N, 3, H, W)`` model inputs, photos like the training ones through
            the eval transform; `CALIBRATION_IMAGES` is the CLI's default N.
        metadata: key -> JSON-serialisable value, stored as ``metadata_props``.
        per_channel: one weight scale per output channel (False: one per tensor).
        method: activation range calibration, ``"minmax"``, ``"percentile"`` or ``"entropy"``.
            MinMax keeps two numbers per tensor and batch; the histogram methods (onnxruntime's
            percentile and entropy calibrators) hold every activation of every calibration
            photo (about 0.1 GB a photo for MobileNetV2 at 448 x 336: use 32 photos or fewer).
        reduce_range: 7-bit weights, for x86 CPUs without VNNI (see the module docstring).
        opset: ONNX opset of the float export.
        memory: bytes the calibration may use twice over (`calibration_cap`); default the
            memory available now. onnxruntime's progress lines go to stderr, never stdout.

    Returns:
        ``path``.

    Raises:
        ImportError: onnx or onnxruntime is missing.
        ValueError: ``calibration`` is empty or not ``(N, *input_size)``, ``method`` is unknown, or
            a histogram method would need more than half of ``memory`` (`calibration_cap`).
    """
    _ort()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _check_calibration(calibration, input_size, method)
    cap = calibration_cap(model, input_size, method, memory)
    if cap is not None and len(calibration) > cap:
        need = activation_bytes(model, input_size) * len(calibration)
        raise ValueError(f"method={method!r} keeps every activation of every calibration photo: {len(calibration)} "
                         f"photos need about {need / 2**30:.1f} GiB, more than half of the memory available; "
                         f"give at most {cap} photos, or method='minmax'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_not_symlink(path)
    with tempfile.TemporaryDirectory(prefix=".tlkit-int8-", dir=path.parent) as tmp:
        fp32, prepared, tmp_out = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        export_onnx(model, fp32, input_size, opset=opset, metadata=metadata)
        quant_pre_process(str(fp32), str(prepared))
        # MinMax keeps only per-tensor ReduceMin/ReduceMax per batch; onnxruntime's histogram
        # methods keep every activation of every calibration photo (see `method`).
        with _stdout_to_stderr():
            quantize_static(
                str(prepared), str(tmp_out), _reader(calibration, batch=_CALIBRATION_BATCH),
                quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, _METHODS[method]),
            )
        _with_metadata(tmp_out, metadata)
        tmp_out.replace(path)
    return path


def _session(path: str | Path, threads: int | None = None):
    ort = _ort()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(path: str | Path, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Logits ``(N, num_classes)`` (float32) of an ONNX classifier on ``x`` (``(N, 3, H, W)``)."""
    session = _session(path)
    parts = [session.run(["logits"], {"input": c.numpy()})[0] for c in x.float().cpu().contiguous().split(batch)]
    return torch.from_numpy(np.concatenate(parts))


def images_per_second(path: str | Path, x: torch.Tensor, *, batch: int = 1, seconds: float = 2.0,
                      threads: int | None = None) -> float:
    """Throughput of an ONNX file in onnxruntime on this CPU, in images per second.

    Batches of ``batch`` images of ``x`` (cycled) run after three warm-up runs until at least
    ``seconds`` have passed; ``threads`` is onnxruntime's intra-op thread count (None: its
    default, one per physical core). Batch 1 is how an edge device classifies a photo.
    """
    session = _session(path, threads)
    chunks = [c.numpy() for c in x.float().cpu().contiguous().split(batch)]
    for c in chunks[:3]:
        session.run(["logits"], {"input": c})
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for c in chunks:
            session.run(["logits"], {"input": c})
            done += len(c)
    return done / (time.perf_counter() - start)


def compare_onnx(reference: str | Path, candidate: str | Path, x: torch.Tensor,
                 labels: list[int] | None = None, *, seconds: float = 2.0) -> dict[str, Any]:
    """How a quantised ONNX file (``candidate``) differs from its float32 one (``reference``) on ``x``.

    Returns:
        ``checked_images``; ``top1_agreement`` (fraction of images whose top-1 class is the
        same); with ``labels`` also ``fp32_top1``, ``int8_top1`` and ``top1_change`` (int8
        minus fp32, fractions); ``fp32_images_per_s``, ``int8_images_per_s`` and ``speedup``
        (`images_per_second`, batch 1); ``fp32_mb``, ``int8_mb`` and ``size_ratio`` (file sizes,
        MB = 10**6 bytes).
    """
    ref, got = onnx_logits(reference, x).argmax(1), onnx_logits(candidate, x).argmax(1)
    out: dict[str, Any] = {"checked_images": len(x), "top1_agreement": float((ref == got).float().mean())}
    if labels is not None:
        y = torch.as_tensor(labels)
        out["fp32_top1"], out["int8_top1"] = float((ref == y).float().mean()), float((got == y).float().mean())
        out["top1_change"] = out["int8_top1"] - out["fp32_top1"]
    fast, slow = images_per_second(candidate, x, seconds=seconds), images_per_second(reference, x, seconds=seconds)
    out.update(fp32_images_per_s=slow, int8_images_per_s=fast, speedup=fast / slow)
    sizes = [Path(p).stat().st_size / 1e6 for p in (reference, candidate)]
    out.update(fp32_mb=sizes[0], int8_mb=sizes[1], size_ratio=sizes[1] / sizes[0])
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file, JSON-decoded (class names, data config, backbone)."""
    import onnx

    return {p.key: json.loads(p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props}
