"""From a trained model to a published version: export into a staging folder, score, plot, record,
and rename it to OUT/<max+1>/."""

from __future__ import annotations

import csv
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import keras

from convnet import evaluate, export, mistakes, modeldir, models
from convnet.data import Split
from convnet.train.config import TrainConfig
from convnet.train.recipe import as_float32

log = logging.getLogger(__name__)
LOG_FILE = "log.csv"


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = []
    try:
        devices = [str(d) for d in keras.distribution.list_devices()]
    except Exception:  # not every backend lists devices
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "devices": devices,
            "platform": platform.platform()}


def write_log(history: list[dict], path: Path) -> None:
    """One row per epoch: `epoch` (from 0), then the metrics in name order (Keras's CSVLogger
    layout; a metric an epoch lacks is NA)."""
    names = sorted({k for row in history for k in row} - {"epoch"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", *names], restval="NA")
        writer.writeheader()
        writer.writerows(history)


def plot_curves(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax1), ("accuracy", ax2)):
        for prefix in ("", "val_"):
            if rows[0].get(prefix + key, "NA") != "NA":
                ax.plot(epochs, [float(r[prefix + key]) for r in rows], marker="o",
                        label=(prefix or "train_") + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


def publish(model: keras.Model, cfg: TrainConfig, out: Path, classes: list[str], *, epochs: float,
            test_split: Split | None, train_seconds: float, started: float, history: list[dict],
            num_train: int, replicas: int = 1, facts: dict | None = None,
            calibration_split: Split | None = None) -> Path:
    """Export the trained model into a staging folder, evaluate it and rename it into place.
    `facts` (the training data's class counts, normalisation, class weights) go into
    metrics.json as they are. Given `calibration_split` (images the weights never saw), the
    ONNX model is calibrated on it (convnet.calibrate) before publishing."""
    model = as_float32(model, cfg.preset, cfg.image_size)  # fixed size, float32
    served = models.with_softmax(model)
    staged = modeldir.staging_dir(out)
    try:
        served.save(staged / modeldir.KERAS_FILE)
        modeldir.write_json_atomic(staged / modeldir.LABELS_FILE, classes)
        check = test_split.images[:64] if test_split is not None else None
        if keras.backend.backend() == "tensorflow":
            onnx_diff = export.export_onnx(served, staged / modeldir.ONNX_FILE,
                                           check_images=check)
            predictor = evaluate.load_predictor(staged)
        else:  # tf2onnx needs TensorFlow: export later with `convnet export` where it is
            log.warning("no ONNX export on the %s backend; on a machine with TensorFlow, "
                        "`convnet export --model %s` publishes the next version with "
                        "model.onnx added", keras.backend.backend(), out)
            onnx_diff = None
            predictor = evaluate.keras_predictor(served, classes, staged)
        metrics = {
            "preset": cfg.preset, "image_size": models.input_size(model), "epochs": epochs,
            "batch_size": cfg.batch_size, "augment": cfg.augment,
            "backend": keras.backend.backend(),
            "keras_version": keras.__version__, "train_seconds": round(train_seconds, 1),
            "hardware": hardware(), "data": cfg.data, "num_train": num_train,
            "params": int(model.count_params()), "flops_per_image": models.count_flops(model),
            "onnx_max_abs_diff": onnx_diff, "replicas": replicas, **(facts or {}),
        }
        if test_split is not None:
            report = evaluate.evaluate(predictor, test_split.images, test_split.labels,
                                       tta=cfg.tta, with_probs=True)
            mistakes.write_mistakes(staged, test_split.images, test_split.labels,
                                    report.pop("probs"), classes=classes, tta=cfg.tta,
                                    source="the test split scored at the end of training")
            metrics.update(
                accuracy=report["accuracy"], accuracy_no_tta=report["accuracy_no_tta"],
                top5_accuracy=report["top5_accuracy"], tta=cfg.tta,
                balanced_accuracy=report["balanced_accuracy"],
                per_class_accuracy=report["per_class_accuracy"],
                per_class_precision=report["per_class_precision"],
                per_class_recall=report["per_class_recall"],
                num_test=report["num_images"], confusion_matrix=report["confusion_matrix"],
            )
            evaluate.plot_confusion(report["confusion_matrix"], classes,
                                    staged / "confusion.png")
        if history:
            write_log(history, staged / LOG_FILE)
            plot_curves(staged / LOG_FILE, staged / "curves.png")
        metrics["total_seconds"] = round(time.time() - started, 1)
        modeldir.write_json_atomic(staged / modeldir.METRICS_FILE, metrics)
        modeldir.write_json_atomic(staged / modeldir.CONFIG_FILE, asdict(cfg))
        if calibration_split is not None and (staged / modeldir.ONNX_FILE).is_file():
            calibrate_staged(staged, calibration_split, test_split)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return modeldir.publish(out, staged)


def calibrate_staged(staged: Path, held_out: Split, test_split: Split | None) -> None:
    """Fit the temperature and the unsure rule on `held_out` (the validation split, or the test
    split when there is no validation split) and measure the calibration error on the test
    split; when the test split is `held_out` itself, fit on half of it and measure on the other
    half. The temperature changes no answer, so the accuracy on the whole test split stands."""
    from convnet import calibrate

    if test_split is not None and test_split is not held_out:
        fit_x, fit_y, report_x, report_y = (held_out.images, held_out.labels,
                                            test_split.images, test_split.labels)
        facts: dict = {"data": "the validation split held out of training"}
    else:  # the halves are rebuilt from fit_fraction and seed (bench/unsure.py does)
        facts = {"data": "half of the held-out split (the other half measures the calibration "
                         "error)", "fit_fraction": 0.5, "seed": 0}
        fit_idx, report_idx = calibrate.split_for_fitting(held_out.labels, facts["fit_fraction"],
                                                          facts["seed"])
        fit_x, fit_y = held_out.images[fit_idx], held_out.labels[fit_idx]
        report_x, report_y = held_out.images[report_idx], held_out.labels[report_idx]
    try:
        record = calibrate.calibrate_into(staged, fit_x, fit_y, report_x, report_y, **facts)
    except calibrate.CalibrationError as exc:
        log.warning("not calibrated: %s", exc)
        return
    log.info("calibrated: temperature %.3f, ECE %.4f -> %.4f", record["temperature"],
             record["ece"]["before"], record["ece"]["after"])
