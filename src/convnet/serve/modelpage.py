"""GET /models/<name>: what the served model is and how well it does, as one HTML page without
JavaScript: test accuracy, per-class accuracy, precision and recall, the confusion matrix, the
training curves, calibration, how and on what it was trained, and the test images it got most
confidently wrong.

Everything is read from the version folder as `convnet train`, `evaluate` and `calibrate` left it
(metrics.json, log.csv, calibration.json, reliability.png, mistakes.json); plots are inline SVG
drawn from those numbers (convnet.serve.charts). Each file is optional: a section whose file is
missing or unreadable says so or is left out, never a 500. Where metrics.json has a confusion
matrix but no per-class precision or recall (models published before they were recorded), they
are computed from the matrix, and the page says so.
"""

from __future__ import annotations

import base64
import csv
import logging
from pathlib import Path

from flask import Blueprint, render_template

from convnet.calibration import RELIABILITY_FILE
from convnet.mistakes import read_mistakes
from convnet.modeldir import ModelDirError, load_config
from convnet.serve.charts import line_chart
from convnet.serve.errors import ApiError, describe
from convnet.serve.model import LoadedModel
from convnet.serve.pipeline import get_model
from convnet.serve.web import CONTENT_SECURITY_POLICY

log = logging.getLogger(__name__)
bp = Blueprint("models", __name__)

LOG_FILE = "log.csv"  # per-epoch training log, as convnet.train.publish writes it
MAX_EMBEDDED_PNG = 2 * 1024 * 1024  # bytes; a larger reliability.png is not inlined
CURVES = (("loss", "Loss"), ("accuracy", "Accuracy"))  # log.csv column -> chart title


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _per_class(metrics: dict, key: str, labels: list[str]) -> list[float | None] | None:
    """metrics[key] as one value per label, or None if absent or not a {label: number} map."""
    record = metrics.get(key)
    if not isinstance(record, dict) or not any(label in record for label in labels):
        return None
    return [_number(record.get(label)) for label in labels]


def confusion_matrix(metrics: dict, labels: list[str]) -> list[list[int]] | None:
    """metrics.json's confusion matrix (rows: true class), if it is C x C non-negative ints."""
    matrix = metrics.get("confusion_matrix")
    size = len(labels)
    if (isinstance(matrix, list) and len(matrix) == size
            and all(isinstance(row, list) and len(row) == size for row in matrix)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for row in matrix for v in row)):
        return matrix
    return None


def per_class_rows(metrics: dict, labels: list[str], matrix) -> tuple[list[dict], bool]:
    """One row per class: its test images, recall (= the class's accuracy) and precision; and
    whether either had to be computed from the confusion matrix."""
    precision = _per_class(metrics, "per_class_precision", labels)
    recall = (_per_class(metrics, "per_class_recall", labels)
              or _per_class(metrics, "per_class_accuracy", labels))
    counts = _per_class(metrics, "per_class_count", labels)
    computed = False
    if matrix is not None:
        hits = [matrix[i][i] for i in range(len(labels))]
        actual = [sum(row) for row in matrix]
        predicted = [sum(col) for col in zip(*matrix, strict=True)]
        if precision is None:
            precision, computed = [h / p if p else None for h, p in
                                   zip(hits, predicted, strict=True)], True
        if recall is None:
            recall, computed = [h / a if a else None for h, a in
                                zip(hits, actual, strict=True)], True
        counts = counts or [float(a) for a in actual]
    columns = {"recall": recall, "precision": precision, "count": counts}
    rows = [{"label": label, **{key: (values[i] if values else None)
                                for key, values in columns.items()}}
            for i, label in enumerate(labels)]
    return rows, computed


def confusion_cells(matrix: list[list[int]]) -> list[list[dict]]:
    """Per cell: the count and its share of the true class's images (the cell's shade)."""
    return [[{"count": v, "share": v / (sum(row) or 1), "diagonal": i == j}
             for j, v in enumerate(row)] for i, row in enumerate(matrix)]


def training_curves(version_dir: Path) -> list:
    """Inline SVG charts (loss, accuracy; train and validation) from log.csv; [] without it."""
    path = version_dir / LOG_FILE
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return []

    def points(column: str) -> list[tuple[float, float]]:
        out = []
        for row in rows:
            try:
                out.append((float(row["epoch"]) + 1, float(row[column])))
            except (KeyError, TypeError, ValueError):  # NA, a missing column, a short row
                continue
        return out

    charts = []
    for column, title in CURVES:
        series = {"train": points(column), "validation": points(f"val_{column}")}
        if any(series.values()):
            charts.append(line_chart(series, title=title, x_label="epoch"))
    return charts


def calibration_facts(model: LoadedModel) -> dict | None:
    """ECE before and after temperature scaling, the temperature, the unsure rule's flag rate,
    and reliability.png as a data: URL; None for a model never calibrated."""
    record = model.calibration if isinstance(model.calibration, dict) else {}
    png = model.path / RELIABILITY_FILE
    image = None
    if png.is_file() and png.stat().st_size <= MAX_EMBEDDED_PNG:
        image = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    ece, unsure = (value if isinstance(value := record.get(key), dict) else {}
                   for key in ("ece", "unsure"))
    facts = {"ece_before": _number(ece.get("before")), "ece_after": _number(ece.get("after")),
             "temperature": _number(record.get("temperature")),
             "flag_rate": _number(unsure.get("flag_rate")), "reliability_png": image}
    return facts if any(v is not None for v in facts.values()) else None


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min {rest} s"


def training_facts(metrics: dict, config: dict, model: LoadedModel) -> list[tuple[str, str]]:
    """(term, value) pairs for how the model was trained, only those recorded."""
    def get(key):
        value = metrics.get(key, config.get(key))
        return None if value in (None, "", [], {}) else value

    facts: list[tuple[str, str]] = []
    if get("preset"):
        facts.append(("Preset", str(get("preset"))))
    if get("epochs") is not None:
        facts.append(("Epochs", f"{get('epochs'):g}" if _number(get("epochs")) is not None
                      else str(get("epochs"))))
    for key, term in (("batch_size", "Batch size"), ("augment", "Augmentation")):
        if get(key) is not None:
            facts.append((term, str(get(key))))
    facts.append(("Input", f"{model.input_size}×{model.input_size} RGB pixels"))
    if get("data"):
        images = _number(metrics.get("num_train"))
        facts.append(("Training data", str(get("data")) +
                      (f" ({images:,.0f} images)" if images is not None else "")))
    for key, term in (("train_seconds", "Training time"),
                      ("total_seconds", "Time to the published model")):
        if _number(metrics.get(key)) is not None:
            facts.append((term, _duration(metrics[key])))
    hardware = metrics.get("hardware")
    if isinstance(hardware, dict):
        cpu = str(hardware.get("cpu") or "")
        if hardware.get("cpu_count"):
            cpu += f" ({hardware['cpu_count']} CPUs)"
        devices = hardware.get("devices")
        if isinstance(devices, list) and devices:
            cpu += "; " + ", ".join(str(d) for d in devices)
        if cpu:
            facts.append(("Hardware", cpu))
    if get("backend"):
        version = metrics.get("keras_version")
        facts.append(("Backend", f"{get('backend')}" + (f", Keras {version}" if version else "")))
    if _number(metrics.get("params")) is not None:
        facts.append(("Parameters", f"{metrics['params']:,}"))
    if _number(metrics.get("flops_per_image")) is not None:
        facts.append(("FLOPs per image", f"{metrics['flops_per_image'] / 1e6:,.0f} M"))
    for key, term in (("trained_by", "Trained by"), ("exported_by", "Exported by"),
                      ("exported_from", "Exported from")):
        if get(key):
            facts.append((term, str(get(key))))
    return facts


def summary(metrics: dict, matrix) -> list[tuple[str, str]]:
    """(term, value) pairs for the test scores recorded."""
    facts = []
    for key, term in (("accuracy", "Test accuracy"), ("accuracy_no_tta", "Without TTA"),
                      ("top5_accuracy", "Top-5 accuracy"),
                      ("balanced_accuracy", "Balanced accuracy")):
        if _number(metrics.get(key)) is not None:
            suffix = " (with test-time augmentation)" if key == "accuracy" and metrics.get(
                "tta") else ""
            facts.append((term, f"{metrics[key] * 100:.2f}%{suffix}"))
    images = _number(metrics.get("num_test"))
    if images is None and matrix is not None:
        images = float(sum(map(sum, matrix)))
    if images is not None:
        facts.append(("Test images", f"{images:,.0f}"))
    return facts


def _config(model: LoadedModel) -> dict:
    try:
        config = load_config(model.path)
    except (ModelDirError, OSError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _page(model: LoadedModel | None = None, error: str | None = None, status: int = 200):
    context: dict = {"model": model, "error": error}
    if model is not None:
        metrics = model.metrics if isinstance(model.metrics, dict) else {}
        matrix = confusion_matrix(metrics, model.labels)
        rows, computed = per_class_rows(metrics, model.labels, matrix)
        context.update(
            summary=summary(metrics, matrix), per_class=rows, computed_from_matrix=computed,
            confusion=confusion_cells(matrix) if matrix is not None else None,
            curves=training_curves(model.path), calibration=calibration_facts(model),
            training=training_facts(metrics, _config(model), model),
            mistakes=read_mistakes(model.path))
    html = render_template("model.html", **context)
    return html, status, {"Content-Security-Policy": CONTENT_SECURITY_POLICY}


@bp.get("/models/<name>")
def model_page(name: str):
    return _page(get_model(name))


@bp.errorhandler(ApiError)
def page_error(exc):
    message, status = describe(exc)
    return _page(error=message, status=status)
