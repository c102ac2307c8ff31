"""A web page where a photo is dropped and its top-k classes appear (Gradio, the ``demo`` extra).

``pip install "tlkit[demo]"``, then ``tlkit demo --checkpoint runs/garbage-finetune``, or from
Python::

    demo = build_demo(FineTuner.load("runs/garbage-finetune"))
    demo.launch()

The page classifies the uploaded file itself with `FineTuner.predict`, so it gives the same
answer as ``tlkit predict`` on that file: same eval transform, same decode limits, same
test-time augmentation.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from tlkit.images import BadImageError
from tlkit.tta import check_tta_mode

if TYPE_CHECKING:  # gradio is an optional extra
    import gradio

    from tlkit.finetuner import FineTuner

__all__ = ["build_demo", "launch_demo"]


def _import_gradio():
    # Gradio otherwise phones home (usage analytics, version check) at import and launch.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError('the web demo needs Gradio: pip install "tlkit[demo]"') from e
    return gr


def _describe(tuner: FineTuner) -> str:
    lines = [f"**Backbone:** `{tuner.backbone.name}` · **classes:** {', '.join(tuner.classes)}"]
    metrics = (tuner.checkpoint_metadata or {}).get("metrics") or {}
    shown = {k: metrics[k] for k in ("top1", "macro_f1") if isinstance(metrics.get(k), (int, float))}
    if shown:
        epoch = metrics.get("epoch")
        lines.append("**Validation** " + (f"(epoch {epoch}) " if epoch is not None else "")
                     + ", ".join(f"{k}: {v:.3f}" for k, v in shown.items()))
    return "  \n".join(lines)


def build_demo(tuner: FineTuner, *, top_k: int = 3, tta: str = "none", title: str = "tlkit demo") -> gradio.Blocks:
    """Build the Gradio page for a trained model (not yet served).

    The page has a photo upload, a preview, a "Classify" button and a label showing the
    ``top_k`` most probable classes with their softmax probabilities. Uploading a photo
    classifies it at once. An unreadable or oversized file shows the `BadImageError` message,
    which names the file, on the page.

    Args:
        tuner: the model, e.g. ``FineTuner.load(run_folder)``.
        top_k: classes shown, at most the number of classes.
        tta: test-time augmentation passed to `FineTuner.predict`.
        title: the page title.

    Returns:
        A ``gradio.Blocks``; serve it with ``.launch()`` or `launch_demo`. Its API endpoint
        ``/classify`` takes one image file and returns the file and
        ``{"label": ..., "confidences": [{"label": ..., "confidence": ...}, ...]}``.

    Raises:
        ImportError: Gradio is not installed.
        ValueError: ``top_k`` < 1 or an unknown ``tta`` mode.
    """
    gr = _import_gradio()
    check_tta_mode(tta)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    top_k = min(top_k, len(tuner.classes))

    def classify(path: str | None) -> tuple[str | None, dict[str, float] | None]:
        if path is None:
            return None, None
        try:
            prediction = tuner.predict(path, tta=tta)[0]
        except BadImageError as e:
            raise gr.Error(str(e)) from e
        return path, prediction.probabilities

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\n{_describe(tuner)}")
        with gr.Row():
            with gr.Column():
                # A file input, not gr.Image: Gradio would decode the upload itself first, and a
                # broken photo would fail there without tlkit's message naming the file.
                upload = gr.File(label="Photo", file_types=["image"], type="filepath")
                preview = gr.Image(label="Uploaded photo", interactive=False, height=320)
            label = gr.Label(num_top_classes=top_k, label="Prediction")
        button = gr.Button("Classify", variant="primary")
        button.click(classify, upload, [preview, label], api_name="classify")
        upload.upload(classify, upload, [preview, label], api_name=False)
        upload.clear(lambda: (None, None), None, [preview, label], api_name=False)
    return demo


def launch_demo(
    tuner: FineTuner, *, host: str = "127.0.0.1", port: int | None = None, top_k: int = 3, tta: str = "none",
    block: bool = True, **launch_kwargs: Any,
) -> gradio.Blocks:
    """Serve `build_demo` on ``http://host:port`` (Gradio picks a free port from 7860 if ``port`` is None).

    Args:
        tuner: the model.
        host: interface to listen on; ``"0.0.0.0"`` serves other machines too.
        port: TCP port.
        top_k: classes shown.
        tta: test-time augmentation mode.
        block: wait until interrupted (the CLI); ``False`` returns once the server is up.
        **launch_kwargs: passed to ``gradio.Blocks.launch`` (e.g. ``share=True``, which needs network).

    Returns:
        The running ``gradio.Blocks``; its ``local_url`` is the page, ``close()`` stops it.
    """
    demo = build_demo(tuner, top_k=top_k, tta=tta)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, **launch_kwargs)
    return demo
