"""Restore a model version and test it: accuracy, per-class and top-5 accuracy, confusion matrix,
and top-k predictions for image files.

ONNX Runtime by default (no TensorFlow needed); `backend="keras"` restores model.keras instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convnet import augment, modeldir
from convnet.imaging import ImageError, decode_image

BATCH = 256  # images per inference call when scoring a dataset


@dataclass
class Predictor:
    """A restored model: `probabilities(images)` maps uint8 (N, 32, 32, 3) to (N, C)."""

    version_dir: Path
    labels: list[str]
    backend: str
    _run: Callable[[np.ndarray], np.ndarray]  # uint8 (n, S, S, 3) -> probabilities (n, C)

    def probabilities(self, images: np.ndarray, *, tta: bool = False) -> np.ndarray:
        return self.probabilities_and_plain(images, tta=tta)[0]

    def probabilities_and_plain(self, images: np.ndarray, *, tta: bool = False):
        """(probabilities, probabilities of the unaugmented images): one pass for both."""
        if not tta:
            probs = self._batched(images)
            return probs, probs
        views = [(self._batched(np.ascontiguousarray(v)), w) for v, w in augment.tta_views(images)]
        return sum(p * w for p, w in views), views[0][0]  # the first view is the image itself

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
        name = session.get_inputs()[0].name
        run = lambda x: session.run(None, {name: x})[0]  # noqa: E731
    elif backend == "keras":
        path = vdir / modeldir.KERAS_FILE
        if not path.is_file():
            raise modeldir.ModelDirError(f"{vdir} has no {modeldir.KERAS_FILE}")
        import keras

        import convnet.models  # noqa: F401  registers the custom activation

        return keras_predictor(keras.models.load_model(path, compile=False), labels, vdir)
    else:
        raise ValueError(f"unknown backend {backend!r}: onnx or keras")
    return Predictor(vdir, labels, backend, run)


def keras_predictor(model, labels: list[str], vdir: Path) -> Predictor:
    """Wrap an in-memory Keras model (uint8 pixels -> probabilities)."""
    return Predictor(Path(vdir), labels, "keras",
                     lambda x: np.asarray(model(x, training=False)))


def accuracy_report(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Top-1, top-5 and per-class accuracy plus the confusion matrix (rows: true class)."""
    pred = probs.argmax(1)
    k = min(5, probs.shape[1])
    top5 = np.argsort(-probs, axis=1)[:, :k]
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {
        c: float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None
        for i, c in enumerate(classes)
    }
    return {
        "accuracy": float((pred == labels).mean()),
        "top5_accuracy": float((top5 == labels[:, None]).any(1).mean()),
        "per_class_accuracy": per_class,
        "num_images": int(len(labels)),
        "confusion_matrix": confusion.tolist(),
    }


def evaluate(predictor: Predictor, images: np.ndarray, labels: np.ndarray, *,
             tta: bool = False) -> dict:
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    probs, plain = predictor.probabilities_and_plain(images, tta=tta)
    report = accuracy_report(probs, labels, predictor.labels)
    report.update(tta=tta, backend=predictor.backend, model=str(predictor.version_dir),
                  accuracy_no_tta=float((plain.argmax(1) == labels).mean()))
    return report


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
    """Decode each file as the server would and return its top-k classes."""
    decoded = []
    for f in files:
        try:
            decoded.append(decode_image(Path(f).read_bytes()))
        except ImageError as exc:
            raise ImageError(f"{f}: {exc}", exc.status) from None
    ranked = top_k(predictor.probabilities(np.stack(decoded), tta=tta), predictor.labels, k)
    return [
        {"file": str(f), "label": r[0]["label"], "probability": r[0]["probability"], "top_k": r}
        for f, r in zip(files, ranked, strict=True)
    ]
