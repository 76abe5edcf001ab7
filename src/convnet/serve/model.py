"""One loaded model version: an ONNX Runtime session plus its labels and metrics.

`load_model` refuses a version that cannot serve: it opens the session, checks the input and
output signatures against the contract in `convnet.modeldir`, and runs a test inference, so a
broken export is caught before any request sees it. The refusal's `reason` is short and may be
shown to anyone; its full text (paths, ONNX Runtime's own error) is for the log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from convnet.imaging import SIZE
from convnet.modeldir import (
    LABELS_FILE,
    METRICS_FILE,
    ONNX_FILE,
    ModelDirError,
    load_labels,
    load_metrics,
    model_name,
    version_number,
)

INPUT_SHAPE = (SIZE, SIZE, 3)  # one image, height x width x RGB
OUTPUT_NAME = "probabilities"  # what the HTTP protocols call the output, whatever ONNX calls it


class LoadError(ModelDirError):
    """A version that cannot serve. `reason` names no path and quotes no library: clients may see
    it. str() is the whole story for the log: the folder, the reason, and the cause if any."""

    def __init__(self, reason: str, version_dir: Path, cause: BaseException | None = None):
        super().__init__(f"{version_dir}: {reason}" + (f": {cause}" if cause else ""))
        self.reason = reason


@dataclass(frozen=True)
class LoadedModel:
    """Everything a request needs, captured once: a request holds one of these from start to
    finish, so a hot swap never mixes the labels of one version with the session of another."""

    session: ort.InferenceSession
    input_name: str
    labels: list[str]
    metrics: dict
    name: str
    version: int
    path: Path
    fixed_batch: bool  # the graph only takes N == 1, so batches are fed one image at a time
    loaded_at: float = field(default_factory=time.time)  # Unix seconds

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def accuracy(self) -> float | None:
        """Test accuracy as a fraction, if training recorded one."""
        value = self.metrics.get("accuracy")
        return float(value) if isinstance(value, int | float) else None

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 32, 32, 3) uint8 -> (N, C) float32 probabilities. ONNX Runtime sessions are
        thread-safe, so concurrent requests share one session."""
        if self.fixed_batch:
            rows = [self.session.run(None, {self.input_name: pixels[i : i + 1]})[0]
                    for i in range(len(pixels))]
            return np.concatenate(rows).astype(np.float32, copy=False)
        return self.session.run(None, {self.input_name: pixels})[0].astype(np.float32, copy=False)


def _check_signature(session: ort.InferenceSession, path: Path) -> bool:
    """Raise LoadError unless the graph is uint8 (N, 32, 32, 3) -> float (N, C).
    Returns whether the batch dimension is fixed at 1."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise LoadError(f"expected one input, found {len(inputs)}", path)
    if not outputs:
        raise LoadError("the graph has no output", path)
    spec = inputs[0]
    if spec.type != "tensor(uint8)":
        raise LoadError(f"input {spec.name!r} is {spec.type}, expected tensor(uint8)", path)
    shape = list(spec.shape)
    # Symbolic dimensions come back as strings or None; only fixed ints can contradict us.
    if len(shape) != 4 or any(
        isinstance(dim, int) and dim != want
        for dim, want in zip(shape[1:], INPUT_SHAPE, strict=True)
    ):
        raise LoadError(f"input shape {shape}, expected [N, 32, 32, 3]", path)
    return shape[0] == 1


def _test_inference(model: LoadedModel) -> None:
    """Run two images through the model and check the output is a probability per class."""
    probe = np.zeros((2, *INPUT_SHAPE), dtype=np.uint8)
    probe[1] = np.arange(SIZE * SIZE * 3, dtype=np.uint32).reshape(INPUT_SHAPE) % 256
    try:
        probs = model.predict(probe)
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise LoadError("test inference failed", model.path, exc) from None
    if probs.shape != (2, model.num_classes):
        raise LoadError(
            f"output shape {list(probs.shape)} for 2 images, expected "
            f"[2, {model.num_classes}] (one probability per label in labels.json)", model.path,
        )
    if not np.all(np.isfinite(probs)) or probs.min() < 0:
        raise LoadError("output holds negative or non-finite values", model.path)
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise LoadError(
            "output rows do not sum to 1; the model must end with a softmax", model.path
        )


def load_model(version_dir: Path, *, inference_threads: int = 1) -> LoadedModel:
    """Open and validate one version folder; raise LoadError with the reason if unusable.

    inference_threads: ONNX Runtime intra-op threads per session (0 = one per core). Gunicorn
    already runs several workers, each with its own session, so one thread each avoids
    oversubscribing the CPU for a network this small.
    """
    version_dir = Path(version_dir)
    onnx_path = version_dir / ONNX_FILE
    if not onnx_path.is_file():
        raise LoadError(f"no {ONNX_FILE}", version_dir)
    labels = _read(load_labels, LABELS_FILE, version_dir)
    metrics = _read(load_metrics, METRICS_FILE, version_dir)
    if not isinstance(metrics, dict):
        raise LoadError(f"{METRICS_FILE} must hold a JSON object", version_dir)

    options = ort.SessionOptions()
    options.intra_op_num_threads = inference_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only; a refused model is reported by us, with reason
    try:
        session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise LoadError(f"ONNX Runtime cannot load {ONNX_FILE}", version_dir, exc) from None

    fixed_batch = _check_signature(session, version_dir)
    model = LoadedModel(
        session=session,
        input_name=session.get_inputs()[0].name,
        labels=labels,
        metrics=metrics,
        name=model_name(version_dir),
        version=version_number(version_dir),
        path=version_dir,
        fixed_batch=fixed_batch,
    )
    _test_inference(model)
    return model


def _read(load, name: str, version_dir: Path):
    """load(version_dir), with any failure (missing, not UTF-8, not JSON, wrong shape) refused
    as `name` being missing or invalid."""
    try:
        return load(version_dir)
    except (ModelDirError, OSError, ValueError) as exc:
        raise LoadError(f"{name} is missing or invalid", version_dir, exc) from None
