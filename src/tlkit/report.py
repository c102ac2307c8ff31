"""Run artefacts: confusion-matrix and training-curve plots, a per-class report and a model card.

`write_run_report` is what `FineTuner.fit` calls at the end of a run with an ``output_dir``;
it describes the model in ``best.safetensors`` (the epoch with the best ``best_metric``) and
writes, next to the checkpoints:

* ``confusion_matrix.png``: rows normalised to recall, class names on both axes, counts in
  each cell;
* ``curves.png``: train and val loss, val top-1 and macro-F1 per epoch, phase boundaries marked;
* ``report.md`` / ``report.json``: precision, recall, F1 and support per class;
* ``MODEL_CARD.md``: backbone, weights source, data, split, metrics, intended use, limitations.

Plots use matplotlib's non-interactive Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tlkit.checkpoint import atomic_write_bytes
from tlkit.config import best_key
from tlkit.metrics import ClassificationMetrics

if TYPE_CHECKING:
    from tlkit._protocols import Run

__all__ = [
    "class_report",
    "class_report_markdown",
    "model_card",
    "plot_confusion_matrix",
    "plot_training_curves",
    "shipped_metrics",
    "write_run_report",
]


def _save(fig, path: str | Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())  # a crash mid-write keeps the old picture
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(metrics: ClassificationMetrics, path: str | Path, title: str = "") -> Path:
    """Save the confusion matrix as a PNG, each row normalised to sum to 1 (recall on the diagonal).

    Args:
        metrics: the evaluation (its ``matrix`` rows are true classes, columns predictions).
        path: the image file to write.
        title: shown above the matrix.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    m = metrics.matrix.double()
    norm = m / m.sum(1, keepdim=True).clamp_min(1)
    n = len(metrics.classes)
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.5, 1.0 * n + 2))
    im = ax.imshow(norm.numpy(), vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(n), metrics.classes, rotation=45, ha="right")
    ax.set_yticks(range(n), metrics.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({int(m[i, j])})", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(title or f"top-1 {metrics.top1:.1%}, macro-F1 {metrics.macro_f1:.3f} ({metrics.n} images)")
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(history: list[dict[str, Any]], path: str | Path, boundaries: list[int] | None = None) -> Path:
    """Save loss and accuracy per epoch as a PNG (two panels), phase boundaries as dotted lines.

    Args:
        history: `FineTuner.history` (``train_loss``, and ``val_loss``, ``top1``, ``macro_f1``
            where validation ran).
        path: the image file to write.
        boundaries: epochs at which a freeze-policy phase starts.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]  # 1-based epoch numbers
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss")
    if any("val_loss" in r for r in history):
        left.plot(epochs, [r.get("val_loss") for r in history], marker="o", label="val loss")
        if any("map" in r for r in history):  # multi-label: mean average precision instead of top-1
            right.plot(epochs, [r.get("map") for r in history], marker="o", label="val mAP")
        else:
            right.plot(epochs, [r.get("top1") for r in history], marker="o", label="val top-1")
        right.plot(epochs, [r.get("macro_f1") for r in history], marker="o", label="val macro-F1")
    for ax in (left, right):
        for b in boundaries or []:
            ax.axvline(b + 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch")
        ax.legend()
    left.set_title("loss")
    right.set_title("validation")
    fig.tight_layout()
    return _save(fig, path)


def class_report(metrics: ClassificationMetrics) -> dict[str, Any]:
    """Precision, recall, F1 and support per class, plus top-1 and macro-F1 (JSON-ready)."""
    p, r, f = metrics.per_class_precision, metrics.per_class_recall, metrics.per_class_f1
    return {
        "n": metrics.n,
        "top1": metrics.top1,
        "macro_f1": metrics.macro_f1,
        "classes": {c: {"precision": p[c], "recall": r[c], "f1": f[c], "support": metrics.support[c]}
                    for c in metrics.classes},
        "confusion_matrix": metrics.matrix.tolist(),
    }


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def label_report(record: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """A multi-label epoch record as a report: mAP, macro/micro-F1 and per label AP, F1, threshold."""
    return {"map": record["map"], "macro_f1": record["macro_f1"], "micro_f1": record["micro_f1"],
            "labels": {c: {"ap": record["per_label_ap"].get(c), "f1": record["per_label_f1"].get(c),
                           "threshold": t} for c, t in zip(classes, record["thresholds"])}}


def class_report_markdown(report: dict[str, Any]) -> str:
    """`class_report` (or `label_report`) as a Markdown table."""
    if "labels" in report:
        lines = [f"mAP {report['map']:.3f}, macro-F1 {report['macro_f1']:.3f}, micro-F1 {report['micro_f1']:.3f} "
                 "(each label at its threshold, tuned on this validation split).", "",
                 "| label | AP | F1 | threshold |", "|---|---|---|---|"]
        lines += [f"| {c} | {_fmt(v['ap'])} | {_fmt(v['f1'])} | {v['threshold']:.3f} |" for c, v in report["labels"].items()]
        return "\n".join(lines) + "\n"
    lines = [f"Top-1 {report['top1']:.2%}, macro-F1 {report['macro_f1']:.3f} on {report['n']} images.", "",
             "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for c, v in report["classes"].items():
        lines.append(f"| {c} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['f1'])} | {v['support']} |")
    from tlkit.interpret import most_confused

    pairs = most_confused(report["confusion_matrix"], list(report["classes"]))[:5]
    if pairs:
        lines += ["", "Most confused (true -> predicted): "
                  + ", ".join(f"{t} -> {p} ({n})" for t, p, n in pairs) + "."]
    return "\n".join(lines) + "\n"


def model_card(tuner: Run, report: dict[str, Any], data: dict[str, Any] | None = None) -> str:
    """A Markdown model card (after Mitchell et al., 2019, "Model Cards for Model Reporting").

    Args:
        tuner: the trained loop (backbone, head, classes, data config, policy, training config).
        report: `class_report` of the model the card describes.
        data: optional facts about the data: ``root``, ``train_images``, ``val_images``, ``split``.
    """
    meta = tuner.metadata()
    data = data or {}
    weakest = min(((v["recall"], c) for c, v in report.get("classes", {}).items() if v["recall"] is not None),
                  default=None)
    best = tuner.best.get("epoch")
    lines = [
        f"# Model card: {meta['backbone']['name']} classifier for {len(tuner.classes)} classes",
        "",
        "## Model",
        f"- Backbone: timm `{meta['backbone']['name']}` with `{json.dumps(meta['backbone']['model_kwargs'])}`; "
        f"pretrained weights: {meta['backbone']['weights_source']}.",
        f"- Head: {json.dumps(meta['head'])}; classes in index order: {', '.join(tuner.classes)}.",
        f"- Input: RGB {tuple(meta['data_config']['input_size'])}, mean {meta['data_config']['mean']}, "
        f"std {meta['data_config']['std']}, {meta['data_config']['interpolation']} resize, "
        f"crop_pct {meta['data_config']['crop_pct']}.",
        f"- Trained with tlkit {meta['tlkit_version']}: {len(tuner.history)} epochs "
        f"(best by {best_key(tuner.config, tuner.multilabel)}: epoch {best if best is not None else 'n/a'}), "
        f"freeze policy `{json.dumps(meta['freeze_policy'])}`.",
        "",
        "## Data",
        f"- Images: {data.get('root', 'not recorded')}; {data.get('train_images', '?')} training and "
        f"{data.get('val_images', report.get('n', '?'))} validation images ({data.get('split', 'split not recorded')}).",
        "",
        "## Metrics (validation set, the checkpoint in best.safetensors)",
        "",
        class_report_markdown(report),
        "## Intended use",
        "- Sorting photos into the classes above when the photos resemble the training data "
        "(one object, similar framing and lighting).",
        "",
        "## Limitations",
        "- The checkpoint was chosen on the same validation set these metrics come from, so they are "
        "optimistic; use `tlkit.cross_validate` or a held-out test set for an unbiased estimate.",
        "- A photo of anything else still gets one of these classes; probabilities are not calibrated "
        "for out-of-distribution inputs.",
    ]
    if weakest is not None:
        lines.append(f"- Weakest class by recall: `{weakest[1]}` ({weakest[0]:.2f}).")
    return "\n".join(lines) + "\n"


def calibration_report(record: dict[str, Any]) -> dict[str, Any]:
    """The calibration of an epoch record (`tlkit.calibration`), as ``{"calibration": {...}}``, or ``{}``."""
    keys = ("temperature", "ece_raw", "ece", "reject_threshold")
    return {"calibration": {k: record[k] for k in keys}} if all(k in record for k in keys) else {}


def calibration_markdown(report: dict[str, Any]) -> str:
    """A paragraph on the calibration of ``report`` (empty without one)."""
    c = report.get("calibration")
    if not c:
        return ""
    from tlkit.calibration import REJECT_COVERAGE

    return (f"\n## Calibration (validation split)\n\nTemperature {c['temperature']:.3f} (probabilities are "
            f"softmax(logits / T)); expected calibration error {c['ece_raw']:.3f} before, {c['ece']:.3f} after. "
            f"Predictions below a probability of {c['reject_threshold']:.3f} say \"not sure\": "
            f"{REJECT_COVERAGE:.0%} of the validation photos are above it. Both were fitted on the validation "
            "split that also chose this checkpoint, so they are optimistic on other photos.\n")


def shipped_metrics(tuner: Run) -> tuple[dict[str, Any], ClassificationMetrics] | None:
    """The validation record and metrics of the checkpoint a run folder ships, or ``None`` (no validation).

    That is the best epoch (``tuner.best``, what ``best.safetensors`` holds and `FineTuner.load`
    loads), else the last validated one. The report, the model card and ``tlkit train``'s
    summary all describe this one.
    """
    records = [r for r in tuner.history if "confusion_matrix" in r or "map" in r]
    if not records:
        return None
    record = next((r for r in records if r["epoch"] == tuner.best.get("epoch")), records[-1])
    if "map" in record:
        return record, _LabelSummary(record, tuner.classes)
    return record, ClassificationMetrics(tuner.classes, torch.tensor(record["confusion_matrix"]), record.get("val_loss"))


class _LabelSummary:
    """A multi-label epoch record with ``to_dict`` (what `shipped_metrics` returns for it)."""

    def __init__(self, record: dict[str, Any], classes: list[str]) -> None:
        self.record, self.classes = record, classes

    def to_dict(self) -> dict[str, Any]:
        r = self.record
        return {"map": r["map"], "macro_f1": r["macro_f1"], "micro_f1": r["micro_f1"],
                "per_label_ap": r["per_label_ap"], "per_label_f1": r["per_label_f1"],
                "thresholds": dict(zip(self.classes, r["thresholds"])), "classes": list(self.classes),
                "loss": r["val_loss"]}


def write_run_report(tuner: Run, out_dir: str | Path, data: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write the plots, ``report.md`` / ``report.json`` and ``MODEL_CARD.md`` for a finished run.

    The metrics are those of the best epoch in ``tuner.history`` (what ``best.safetensors``
    holds), or of the last epoch when no epoch was validated.

    Args:
        tuner: after `FineTuner.fit`.
        out_dir: the run folder.
        data: facts for the model card (see `model_card`).

    Returns:
        Name -> path of every file written. Plots are skipped (with a note on stderr) if
        matplotlib is not installed.
    """
    out = Path(out_dir)
    written: dict[str, Path] = {}
    shipped = shipped_metrics(tuner)
    if shipped is not None:
        record, metrics = shipped
        base = label_report(record, tuner.classes) if "map" in record else class_report(metrics)
        report = {**base, "epoch": record["epoch"], **calibration_report(record)}
        atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
        atomic_write_bytes(out / "report.md", (f"# Validation report (epoch {record['epoch']})\n\n"
                                               + class_report_markdown(report)
                                               + calibration_markdown(report)).encode())
        atomic_write_bytes(out / "MODEL_CARD.md", model_card(tuner, report, data).encode())
        written.update(report_json=out / "report.json", report_md=out / "report.md", model_card=out / "MODEL_CARD.md")
    try:
        if shipped is not None and isinstance(metrics, ClassificationMetrics):
            written["confusion_matrix"] = plot_confusion_matrix(metrics, out / "confusion_matrix.png")
        if tuner.history:
            written["curves"] = plot_training_curves(tuner.history, out / "curves.png", tuner.policy.boundaries())
    except ImportError:
        import sys

        print("tlkit: plots skipped, matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return written
