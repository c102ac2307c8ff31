"""A web page where a photo is dropped and its top-k classes appear (Gradio, the ``demo`` extra).

``pip install "tlkit[demo]"``, then ``tlkit demo --checkpoint runs/garbage-finetune``, or from
Python::

    demo = build_demo(FineTuner.load("runs/garbage-finetune"))
    demo.launch()

The page classifies the uploaded file itself with `FineTuner.predict`, so it gives the same
answer as ``tlkit predict`` on that file: same eval transform, same decode limits, same
test-time augmentation.

A visitor's mistake (a broken or oversized file) is one line on the page and one line in the
server's log. The page is meant to be shown to strangers, so it keeps nothing: an upload larger than
``max_upload_bytes`` (default 20 MiB) is refused by Gradio before it is stored and by tlkit
before it is decoded; each upload is deleted once classified, and whatever else Gradio caches
for the page (previews, uploads never classified) is deleted after `CACHE_SECONDS` and when the
server stops. Error messages name the upload by its base name, never by its path on the server.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlkit._text import escape_control, markdown_text
from tlkit.images import BadImageError, load_image
from tlkit.tta import check_tta_mode

if TYPE_CHECKING:  # gradio is an optional extra
    import gradio

    from tlkit._protocols import Run

__all__ = ["build_demo", "launch_demo", "DEFAULT_MAX_UPLOAD_BYTES", "CACHE_SECONDS", "UPLOAD_QUOTA_FILES", "UploadQuota"]

DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20  # a phone photo is 2-12 MB
# Gradio's cache (previews, uploads that were never classified) is swept every minute for files
# older than this, and emptied when the server stops.
CACHE_SECONDS = 300
_PREVIEW_SIDE = 640  # pixels: the preview is a downscaled copy, not the uploaded file
# An upload's base name is shown in messages only if it is plain: the page renders messages.
_PLAIN_NAME = re.compile(r"[\w\-. ()]{1,100}")


def _import_gradio():
    # Gradio otherwise phones home (usage analytics, version check) at import and launch.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError('the web demo needs Gradio: pip install "tlkit[demo]"') from e
    return gr


def _describe(tuner: Run) -> str:
    # Class names come from folder names or a stranger's checkpoint: shown as text, never as markup.
    classes = ", ".join(markdown_text(c) for c in tuner.classes)
    lines = [f"**Backbone:** {markdown_text(tuner.backbone.name)} · **classes:** {classes}"]
    metrics = (tuner.checkpoint_metadata or {}).get("metrics") or {}
    shown = {k: metrics[k] for k in ("top1", "macro_f1") if isinstance(metrics.get(k), (int, float))}
    if shown:
        epoch = metrics.get("epoch")
        lines.append("**Validation** " + (f"(epoch {markdown_text(str(epoch))}) " if epoch is not None else "")
                     + ", ".join(f"{k}: {v:.3f}" for k, v in shown.items()))
    return "  \n".join(lines)


def _size(n: float) -> str:
    """Bytes for people: ``"20 MiB"``, ``"29.3 KiB"``."""
    value, unit = (n / 2**20, "MiB") if n >= 2**20 else (n / 2**10, "KiB")
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


def _upload_folder() -> Path:
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def _shown_name(name: str) -> str:
    # The visitor's own file name, if it is plain text (Gradio renders error messages).
    name = Path(name).name
    return name if _PLAIN_NAME.fullmatch(name) else "the uploaded file"


def _public_message(message: str, path: str, name: str) -> str:
    """``message`` with every server path replaced by ``name`` or "the uploaded file"."""
    for form in sorted({path, str(Path(path).resolve())}, key=len, reverse=True):
        message = message.replace(form, name)
    return re.sub(re.escape(str(_upload_folder())) + r"[^\s:'\"]*", "the uploaded file", message)


def _delete_upload(path: str) -> None:
    """Delete an upload (and its folder, if now empty); only inside Gradio's upload folder."""
    file = Path(path).resolve()
    if _upload_folder() not in file.parents:
        return  # not an upload: a caller's own file is never deleted
    file.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        file.parent.rmdir()


def _classify_upload(tuner: Run, path: str, name: str, tta: str, max_bytes: int, error: type[Exception]):
    """Preview and class probabilities of the upload at ``path``, called ``name`` in messages.

    Raises:
        error: (``gradio.Error``, shown on the page) the upload is gone, over ``max_bytes``, or
            cannot be decoded; the message names the upload by its base name only.
    """
    try:
        size = os.path.getsize(path)
    except OSError:
        raise error(f"{name}: no longer on the server (uploads are deleted once classified); upload it again") from None
    if size > max_bytes:  # before decoding: Gradio's own limit is not set when the page is embedded elsewhere
        raise error(f"{name}: {_size(size)} is over this demo's upload limit of {_size(max_bytes)}")
    try:
        prediction = tuner.predict(path, tta=tta, max_bytes=max_bytes, on_error="raise")[0]
        preview = load_image(path, max_bytes=max_bytes, draft_size=_PREVIEW_SIDE)
    except BadImageError as e:
        raise error(_public_message(str(e), path, name)) from None
    preview.thumbnail((_PREVIEW_SIDE, _PREVIEW_SIDE))
    if prediction.labels is not None:  # multi-label: the answer is a set, not the top bar of the chart
        _NOTES[path] = _labels_note(prediction.labels, tuned=tuner.thresholds is not None)
    elif not prediction.sure:  # below the reject threshold fitted on the validation photos
        threshold = (tuner.calibration or {}).get("reject_threshold", 0.0)
        _NOTES[path] = (f"**Not sure.** The most probable class, {markdown_text(prediction.label)}, has "
                        f"{prediction.probability:.0%}, below the {threshold:.0%} this model needs to answer.")
    return preview, prediction.probabilities


def _labels_note(labels: Sequence[str], tuned: bool = True) -> str:
    """The status line of a multi-label answer: the labels at or above their thresholds (tuned on the
    validation photos, or 0.5 for a model that has none stored)."""
    where = "the threshold tuned for it on the validation photos" if tuned else "0.5 (this model stores no thresholds)"
    if not labels:
        return f"**No label** reaches {where}."
    return (f"**Labels:** {', '.join(markdown_text(label) for label in labels)} (each at or above {where}; "
            "the bars are independent probabilities).")


def _check_arguments(top_k: int, tta: str, max_upload_bytes: int, examples: Sequence[str | Path]) -> None:
    """The errors `build_demo` documents, before anything is built."""
    missing = [str(p) for p in examples if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"demo examples not found: {missing[:3]}")
    check_tta_mode(tta)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be >= 1, got {max_upload_bytes}")


def build_demo(
    tuner: Run, *, top_k: int = 3, tta: str = "none", title: str = "tlkit demo",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, examples: Sequence[str | Path] = (),
) -> gradio.Blocks:
    """Build the Gradio page for a trained model (not yet served).

    The page has a photo upload, a preview, a label showing the ``top_k`` most probable classes
    with their softmax probabilities, and a one-line status. Uploading a photo classifies it at
    once, then deletes the uploaded file; there is no button to press, so no click sequence
    can ask for a file that is gone. An unreadable or oversized file shows one line in the
    status (naming the file by its base name only) and writes one line to the server's stderr,
    never a traceback. Class names on the page are shown as text (never as Markdown or HTML).

    Args:
        tuner: the model, e.g. ``FineTuner.load(run_folder)``.
        top_k: classes shown, at most the number of classes.
        tta: test-time augmentation passed to `FineTuner.predict`.
        title: the page title.
        max_upload_bytes: larger uploads are refused before they are decoded. `launch_demo`
            also hands it to Gradio (``max_file_size``), which refuses them before storing them.
        examples: photos of the operator's shown as thumbnails under the upload (copied under
            neutral names, ``example-1.jpg``..., so no file name gives the answer away); a click
            classifies one. The operator's files are never changed or deleted.

    Returns:
        A ``gradio.Blocks``; serve it with ``.launch()`` or `launch_demo`. Its API endpoint
        ``/classify`` takes one image file and returns a preview (a downscaled copy, at most
        640 pixels a side) and
        ``{"label": ..., "confidences": [{"label": ..., "confidence": ...}, ...]}``; a bad file
        is an error naming the file by its base name.

    Raises:
        ImportError: Gradio is not installed.
        ValueError: ``top_k`` < 1, ``max_upload_bytes`` < 1 or an unknown ``tta`` mode.
        FileNotFoundError: an example is not a file.
    """
    gr = _import_gradio()
    _check_arguments(top_k, tta, max_upload_bytes, examples)

    def run(path: str, name: str, keep: bool):
        try:
            return _classify_upload(tuner, path, name, tta, max_upload_bytes, _UserError)
        finally:
            if not keep:
                _delete_upload(path)

    def classify_api(upload: dict[str, Any] | str | None):
        # The /classify endpoint: a bad file is an error for the API client, with no traceback in the log.
        path, name = _payload(upload)
        if not path:
            return None, None
        try:
            return run(path, name, keep=False)
        except _UserError as e:
            _log(str(e))
            raise gr.Error(str(e), print_exception=False) from None
        finally:
            _NOTES.pop(path, None)

    def on_upload(upload: dict[str, Any] | str | None):
        path, name = _payload(upload)
        if not path:
            return None, None, ""
        return _shown(lambda: run(path, name, keep=False), path)

    copies = _neutral_copies(examples)

    def on_example(evt):
        # An operator's photo (its neutral copy): kept.
        return _shown(lambda: run(str(copies[evt.index]), f"example {evt.index + 1}", keep=True), str(copies[evt.index]))

    # Gradio passes the click's SelectData to a parameter annotated with its class; the class
    # object itself, since this module's annotations are strings and `gr` is local here.
    on_example.__annotations__["evt"] = gr.SelectData

    return _layout(gr, tuner, (classify_api, on_upload, on_example), title=title,
                   top_k=min(top_k, len(tuner.classes)), max_upload_bytes=max_upload_bytes, examples=copies)


class _UserError(Exception):
    """A visitor's file that cannot be classified: one line, shown on the page and logged."""


def _payload(upload: dict[str, Any] | str | None) -> tuple[str | None, str]:
    """``(server path, name shown)`` of Gradio's file payload (``{"path", "orig_name", ...}``)."""
    path = upload if isinstance(upload, str) else (upload or {}).get("path")
    if not path:
        return None, ""
    return path, _shown_name((upload.get("orig_name") if isinstance(upload, dict) else None) or path)


def _log(message: str) -> None:
    print(f"tlkit demo: {escape_control(message)}", file=sys.stderr, flush=True)


_NOTES: dict[str, str] = {}  # upload path -> "not sure" note, handed from _classify_upload to _shown


def _shown(classify, path: str) -> tuple[Any, Any, str]:
    """``(preview, label, status)`` for the page: a user error is the status line, never an exception;
    an answer below the reject threshold says "Not sure" there."""
    try:
        preview, probabilities = classify()
    except _UserError as e:
        _log(str(e))
        return None, None, f"**Could not classify:** {markdown_text(str(e))}"
    return preview, probabilities, _NOTES.pop(path, "")


def _neutral_copies(examples: Sequence[str | Path]) -> list[Path]:
    """The example photos copied as ``example-1.jpg``... into a private temporary folder (removed at exit)."""
    if not examples:
        return []
    folder = Path(tempfile.mkdtemp(prefix="tlkit-examples-", dir=os.environ.get("GRADIO_TEMP_DIR") or None))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    copies = []
    for i, photo in enumerate(examples, 1):
        copy = folder / f"example-{i}{Path(photo).suffix.lower()}"
        shutil.copyfile(photo, copy)
        copies.append(copy)
    return copies


def _layout(gr, tuner: Run, handlers: tuple, *, title: str, top_k: int, max_upload_bytes: int,
            examples: list[Path]) -> gradio.Blocks:
    """The page's components and events around the handlers (API, upload, example click)."""
    classify_api, on_upload, on_example = handlers
    # delete_cache: Gradio sweeps its cache every 60 s for this page's files older than
    # CACHE_SECONDS, and deletes them all when the server stops.
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(60, CACHE_SECONDS)) as demo:
        gr.Markdown(f"# {markdown_text(title)}\n{_describe(tuner)}")
        with gr.Row():
            with gr.Column():
                # A file input, not gr.Image: Gradio would decode the upload itself first, and a
                # broken photo would fail there without tlkit's message naming the file.
                upload = gr.File(label=f"Photo (at most {_size(max_upload_bytes)}): classified as soon as it is dropped",
                                 file_types=["image"], type="filepath")
                preview = gr.Image(label="Uploaded photo", interactive=False, height=320)
            with gr.Column():
                label = gr.Label(num_top_classes=top_k, label="Prediction")
                status = gr.Markdown("")
        # preprocess=False: the handlers get the payload with the upload's path. gr.File's own
        # preprocessing would leave one empty temporary file in Gradio's cache per request.
        # Gradio still checks that the path is an upload of this server.
        upload.upload(on_upload, upload, [preview, label, status], api_name=False, preprocess=False)
        upload.clear(lambda: (None, None, ""), None, [preview, label, status], api_name=False)
        api = gr.Button(visible=False)  # the API endpoint only: no button on the page
        api.click(classify_api, upload, [preview, label], api_name="classify", preprocess=False)
        if examples:
            gallery = gr.Gallery([str(p) for p in examples], label="Example photos: click one", columns=6,
                                 height=160, allow_preview=False, interactive=False, object_fit="cover")
            gallery.select(on_example, None, [preview, label, status], api_name=False)
    return demo


@contextlib.contextmanager
def private_upload_folder() -> Iterator[Path | None]:
    """Point Gradio's upload cache (``GRADIO_TEMP_DIR``) at a fresh folder; remove it on exit.

    Gradio's default cache, ``<tmp>/gradio``, is shared by every Gradio app of the machine and
    outlives the server; a private one can be removed whole. A ``GRADIO_TEMP_DIR`` the user set
    is kept (and yields ``None``). The variable is process-wide, so this is for a process that
    serves one demo, as ``tlkit demo`` does.
    """
    if os.environ.get("GRADIO_TEMP_DIR"):
        yield None
        return
    folder = tempfile.mkdtemp(prefix="tlkit-demo-")  # mode 0700: other local users cannot read uploads
    os.environ["GRADIO_TEMP_DIR"] = folder
    try:
        yield Path(folder)
    finally:
        os.environ.pop("GRADIO_TEMP_DIR", None)
        shutil.rmtree(folder, ignore_errors=True)


def launch_demo(
    tuner: Run, *, host: str = "127.0.0.1", port: int | None = None, top_k: int = 3, tta: str = "none",
    block: bool = True, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, examples: Sequence[str | Path] = (),
    **launch_kwargs: Any,
) -> gradio.Blocks:
    """Serve `build_demo` on ``http://host:port`` (Gradio picks a free port from 7860 if ``port`` is None).

    Args:
        tuner: the model.
        host: interface to listen on; ``"0.0.0.0"`` serves other machines too.
        port: TCP port.
        top_k: classes shown.
        tta: test-time augmentation mode.
        block: wait until interrupted (the CLI), with uploads in a private temporary folder
            removed when the server stops (`private_upload_folder`); ``False`` returns once the
            server is up.
        max_upload_bytes: largest accepted upload, bytes; Gradio refuses larger ones with HTTP 413
            before storing them (its ``max_file_size``) and tlkit checks again before decoding.
        examples: example photos, as `build_demo`.
        **launch_kwargs: passed to ``gradio.Blocks.launch`` (e.g. ``share=True``, which needs network).

    Returns:
        The running ``gradio.Blocks``; its ``local_url`` is the page, ``close()`` stops it.

    Raises:
        ImportError: Gradio is not installed.
        ValueError: as `build_demo`.
    """
    from starlette.middleware import Middleware

    from tlkit._signals import interrupt_on_signals

    # Built inside the private folder: Gradio copies the example photos into its cache as it builds.
    # SIGTERM ends a blocking server as Ctrl-C does, so the folder and the visitors' uploads go too.
    with (interrupt_on_signals() if block else contextlib.nullcontext()), \
            (private_upload_folder() if block else contextlib.nullcontext()):
        demo = build_demo(tuner, top_k=top_k, tta=tta, max_upload_bytes=max_upload_bytes, examples=examples)
        if "max_file_size" in inspect.signature(demo.launch).parameters:  # where the installed Gradio has it
            launch_kwargs.setdefault("max_file_size", max_upload_bytes)
        app_kwargs = launch_kwargs.setdefault("app_kwargs", {})
        app_kwargs.setdefault("middleware", []).append(
            Middleware(UploadQuota, max_bytes=UPLOAD_QUOTA_FILES * max_upload_bytes, window=CACHE_SECONDS))
        try:
            demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, **launch_kwargs)
        except KeyboardInterrupt:
            demo.close()
    return demo


UPLOAD_QUOTA_FILES = 8
"""Per visitor (client address), uploads may total at most this many times the upload limit within
`CACHE_SECONDS`: a visitor who uploads and never classifies cannot fill the server's disk."""


class UploadQuota:
    """ASGI middleware: refuse (HTTP 429) a client's upload once its uploads of the last ``window``
    seconds total ``max_bytes`` (by their ``Content-Length``; a request without one counts as
    ``max_bytes``)."""

    def __init__(self, app, max_bytes: int, window: float) -> None:
        self.app, self.max_bytes, self.window = app, max_bytes, window
        self.used: dict[str, list[tuple[float, int]]] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/upload"):
            client = (scope.get("client") or ("unknown",))[0]
            size = dict(scope["headers"]).get(b"content-length", b"")
            size = int(size) if size.isdigit() else self.max_bytes
            now = time.monotonic()
            recent = [(t, n) for t, n in self.used.get(client, []) if now - t < self.window]
            if sum(n for _, n in recent) + size > self.max_bytes:
                self.used[client] = recent
                await _refuse(send, f"upload quota reached: at most {_size(self.max_bytes)} of uploads per "
                                    f"{self.window // 60:.0f} minutes; classify or wait")
                return
            self.used[client] = [*recent, (now, size)]
        await self.app(scope, receive, send)


async def _refuse(send, message: str) -> None:
    body = message.encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
