"""Restore a model version and test it: accuracy, per-class and top-5 accuracy, confusion matrix,
and top-k predictions for image files.

ONNX Runtime by default (no TensorFlow needed); `backend="keras"` restores model.keras instead.
Either way the model's input size S comes from the model itself (checked against the image_size
its config.json and metrics.json record), and images are decoded or must come at that size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convnet import augment, calibration, modeldir
from convnet.imaging import ImageError, decode_image

BATCH = 256  # images per inference call when scoring a dataset


@dataclass
class Predictor:
    """A restored model: `probabilities(images)` maps uint8 (N, S, S, 3) to (N, C)."""

    version_dir: Path
    labels: list[str]
    backend: str
    input_size: int  # S, pixels
    _run: Callable[[np.ndarray], np.ndarray]  # uint8 (n, S, S, 3) -> probabilities (n, C)

    def probabilities(self, images: np.ndarray, *, tta: bool = False) -> np.ndarray:
        return self.probabilities_and_plain(images, tta=tta)[0]

    def probabilities_and_plain(self, images: np.ndarray, *, tta: bool = False):
        """(probabilities, probabilities of the unaugmented images): one pass for both."""
        size = self.input_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"images of shape {list(images.shape)}: {self.version_dir} takes "
                             f"[N, {size}, {size}, 3] (load the data with size={size})")
        if not tta:
            probs = self._batched(images)
            return probs, probs
        views = [(self._batched(np.ascontiguousarray(v)), w) for v, w in augment.tta_views(images)]
        # A weighted mean of log-probabilities, i.e. of logits as airbench averages them: unlike
        # a mean of probabilities, its argmax does not move when a temperature sharpens them.
        mean_log = sum(np.log(np.maximum(p, 1e-30)) * w for p, w in views)
        return calibration.softmax(mean_log).astype(np.float32), views[0][0]  # view 0: as is

    def _batched(self, images: np.ndarray) -> np.ndarray:
        out = [self._run(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)


def onnx_session(path: str | os.PathLike, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: one per core
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_predictor(model: str | os.PathLike | None = None, backend: str = "onnx") -> Predictor:
    vdir = modeldir.resolve_version(model)
    labels = modeldir.load_labels(vdir)
    if backend == "onnx":
        path = vdir / modeldir.ONNX_FILE
        if not path.is_file():
            raise modeldir.ModelDirError(f"{vdir} has no {modeldir.ONNX_FILE}; run convnet export")
        session = onnx_session(path)
        spec = session.get_inputs()[0]
        size = modeldir.version_image_size(vdir, spec.shape, modeldir.ONNX_FILE)
        run = lambda x: session.run(None, {spec.name: x})[0]  # noqa: E731
    elif backend == "keras":
        path = vdir / modeldir.KERAS_FILE
        if not path.is_file():
            raise modeldir.ModelDirError(f"{vdir} has no {modeldir.KERAS_FILE}")
        import keras

        import convnet.models  # noqa: F401  registers the custom activation

        return keras_predictor(keras.models.load_model(path, compile=False), labels, vdir)
    else:
        raise ValueError(f"unknown backend {backend!r}: onnx or keras")
    return Predictor(vdir, labels, backend, size, run)


def keras_predictor(model, labels: list[str], vdir: Path) -> Predictor:
    """Wrap an in-memory Keras model (uint8 pixels -> probabilities)."""
    import keras  # convert_to_numpy: a torch output that requires grad has no __array__

    size = modeldir.version_image_size(Path(vdir), model.input_shape, modeldir.KERAS_FILE)
    return Predictor(Path(vdir), labels, "keras", size,
                     lambda x: keras.ops.convert_to_numpy(model(x, training=False)))


def accuracy_report(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Top-1, top-5 and per-class figures plus the confusion matrix (rows: true class).

    Per class: recall (= per-class accuracy: of the images of the class, the share predicted
    as it) and precision (of the images predicted as the class, the share that are); None where
    the denominator is 0. balanced_accuracy is the mean recall over the classes present: with
    imbalanced classes, what accuracy would be if each class counted the same."""
    pred = probs.argmax(1)
    k = min(5, probs.shape[1])
    top5 = np.argsort(-probs, axis=1)[:, :k]
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    hits, actual, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)

    def ratio(num, den):
        return float(num / den) if den else None

    recall = {c: ratio(hits[i], actual[i]) for i, c in enumerate(classes)}
    present = [r for r in recall.values() if r is not None]
    return {
        "accuracy": float((pred == labels).mean()),
        "top5_accuracy": float((top5 == labels[:, None]).any(1).mean()),
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "per_class_accuracy": recall,
        "per_class_precision": {c: ratio(hits[i], predicted[i]) for i, c in enumerate(classes)},
        "per_class_recall": dict(recall),
        "per_class_count": {c: int(actual[i]) for i, c in enumerate(classes)},
        "num_images": int(len(labels)),
        "confusion_matrix": confusion.tolist(),
    }


def evaluate(predictor: Predictor, images: np.ndarray, labels: np.ndarray, *,
             tta: bool = False, with_probs: bool = False) -> dict:
    """The accuracy report (JSON-ready); with_probs adds `probs`, the (N, C) probabilities
    scored (with TTA if asked), as an array."""
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    probs, plain = predictor.probabilities_and_plain(images, tta=tta)
    report = accuracy_report(probs, labels, predictor.labels)
    report.update(tta=tta, backend=predictor.backend, model=str(predictor.version_dir),
                  accuracy_no_tta=float((plain.argmax(1) == labels).mean()),
                  ece=calibration_error(plain, labels, predictor.version_dir))
    if with_probs:
        report["probs"] = probs
    return report


def calibration_error(plain: np.ndarray, labels: np.ndarray, version_dir: Path) -> dict:
    """ECE (15 bins) of the probabilities a single image gets, as served: `after` is the
    model's own (temperature inside the graph) and `before` what they were without it,
    recovered exactly as softmax(T log p); a model never calibrated has only `before`."""
    record = modeldir.read_json(Path(version_dir) / calibration.CALIBRATION_FILE, default={})
    temperature = record.get("temperature") if isinstance(record, dict) else None
    if not isinstance(temperature, int | float):
        return {"before": calibration.expected_calibration_error(plain, labels), "after": None,
                "bins": calibration.ECE_BINS}
    raw = calibration.softmax(temperature * np.log(np.maximum(plain, 1e-30)))
    return {"before": calibration.expected_calibration_error(raw, labels),
            "after": calibration.expected_calibration_error(plain, labels),
            "bins": calibration.ECE_BINS, "temperature": float(temperature)}


def plot_confusion(confusion, classes: list[str], path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    limit = confusion.max() / 2 if confusion.size else 0
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                color="white" if v > limit else "black")
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[list[dict]]:
    """Per image, the k most likely classes, most likely first."""
    k = max(1, min(k, probs.shape[1]))
    order = np.argsort(-probs, axis=1)[:, :k]
    return [
        [{"label": labels[j], "index": int(j), "probability": float(p[j])} for j in row]
        for p, row in zip(probs, order, strict=True)
    ]


def predict_files(predictor: Predictor, files: list[str | os.PathLike], k: int = 5,
                  *, tta: bool = False) -> list[dict]:
    """Decode each file as the server would, at the model's size, and return its top-k
    classes."""
    decoded = []
    for f in files:
        try:
            decoded.append(decode_image(Path(f).read_bytes(), size=predictor.input_size))
        except ImageError as exc:
            raise ImageError(f"{f}: {exc}", exc.status) from None
    ranked = top_k(predictor.probabilities(np.stack(decoded), tta=tta), predictor.labels, k)
    return [
        {"file": str(f), "label": r[0]["label"], "probability": r[0]["probability"], "top_k": r}
        for f, r in zip(files, ranked, strict=True)
    ]
