"""One loaded model version: an ONNX Runtime session plus its labels and metrics.

`load_model` refuses a version that cannot serve: it opens the session, checks the input and
output signatures against the contract in `convnet.modeldir` (uint8 [N, S, S, 3] in, S fixed in
the graph and equal to any image_size config.json and metrics.json record), and runs a test
inference, so a broken export is caught before any request sees it. The refusal's `reason` is
short and may be shown to anyone; its full text (paths, ONNX Runtime's own error) is for the
log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from convnet.calibration import CALIBRATION_FILE, UnsureRule, unsure_scores
from convnet.modeldir import (
    CONFIG_FILE,
    INT8_FILE,
    LABELS_FILE,
    METRICS_FILE,
    ONNX_FILE,
    PRECISION_FILES,
    ModelDirError,
    image_size,
    load_config,
    load_labels,
    load_metrics,
    model_name,
    version_number,
)

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
    input_size: int  # S: the model takes (N, S, S, 3) uint8 pixels; every door decodes to it
    unsure: UnsureRule | None = None  # from calibration.json; None: the model has no such rule
    calibration: dict | None = None  # calibration.json as read (temperature, ece, ...)
    precision: str = "float"  # "int8": model.int8.onnx was loaded instead of model.onnx
    loaded_at: float = field(default_factory=time.time)  # Unix seconds
    # Bytes this version costs the worker: see `load_model`. 0 until measured.
    memory_bytes: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image: height x width x RGB."""
        return (self.input_size, self.input_size, 3)

    @property
    def accuracy(self) -> float | None:
        """Test accuracy as a fraction, if training recorded one."""
        value = self.metrics.get("accuracy")
        return float(value) if isinstance(value, int | float) else None

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, C) float32 probabilities, followed, when the model has an
        unsure rule, by one more column: each image's unsure score (`split` takes them apart).
        One array, so the micro-batcher can stack and slice rows without knowing. ONNX Runtime
        sessions are thread-safe, so concurrent requests share one session."""
        if self.fixed_batch:
            rows = [self._run(pixels[i : i + 1]) for i in range(len(pixels))]
            return np.concatenate(rows)
        return self._run(pixels)

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        rule = self.unsure
        names = [self.session.get_outputs()[0].name]
        if rule is not None and rule.output is not None:
            names.append(rule.output)
        outputs = self.session.run(names, {self.input_name: pixels})
        probs = outputs[0].astype(np.float32, copy=False)
        if rule is None:
            return probs
        scores = unsure_scores(rule.score, probs, outputs[1] if len(outputs) > 1 else None)
        return np.concatenate([probs, scores[:, None].astype(np.float32)], axis=1)

    def split(self, out: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """What `predict` returned -> (probabilities (N, C), unsure scores (N,) or None)."""
        if self.unsure is None:
            return out, None
        return out[:, : self.num_classes], out[:, self.num_classes]


def resident_bytes() -> int:
    """This process's resident set size in bytes (Linux /proc/self/statm), or 0 where there is
    no such file."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _check_signature(session: ort.InferenceSession, records: dict,
                     path: Path) -> tuple[bool, int]:
    """Raise LoadError unless the graph is uint8 (N, S, S, 3) -> float (N, C), S as `records`
    (config.json, metrics.json) say if they say. Returns whether the batch dimension is fixed
    at 1, and S."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise LoadError(f"expected one input, found {len(inputs)}", path)
    if not outputs:
        raise LoadError("the graph has no output", path)
    spec = inputs[0]
    if spec.type != "tensor(uint8)":
        raise LoadError(f"input {spec.name!r} is {spec.type}, expected tensor(uint8)", path)
    shape = list(spec.shape)  # symbolic dimensions come back as strings or None
    try:
        size = image_size(shape, records)
    except ModelDirError as exc:
        raise LoadError(str(exc), path) from None
    return shape[0] == 1, size


def _test_inference(model: LoadedModel) -> None:
    """Run two images through the model and check the output is a probability per class."""
    probe = np.zeros((2, *model.input_shape), dtype=np.uint8)
    probe[1] = np.arange(probe[1].size, dtype=np.uint32).reshape(model.input_shape) % 256
    try:
        probs, scores = model.split(model.predict(probe))
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise LoadError("test inference failed", model.path, exc) from None
    if scores is not None and not np.all(np.isfinite(scores)):
        raise LoadError("the unsure score is not finite for the test images", model.path)
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


def load_model(version_dir: Path, *, inference_threads: int = 1,
               precision: str = "float") -> LoadedModel:
    """Open and validate one version folder; raise LoadError with the reason if unusable.

    inference_threads: ONNX Runtime intra-op threads per session (0 = one per core). Gunicorn
    already runs several workers, each with its own session, so one thread each avoids
    oversubscribing the CPU for a network this small.
    precision: "float" serves model.onnx, "int8" model.int8.onnx (a version without one is
    refused: it is never silently served in float), "auto" the int8 model where the version
    has one and model.onnx otherwise.

    The model's `memory_bytes` is how much the process's resident memory grew from opening the
    session to the end of its test inference (weights, graph, ONNX Runtime's buffers), but never
    less than the ONNX file, whose weights the session keeps in memory: freed pages reused by
    the session can hide growth, and other threads allocating meanwhile can add to it.
    """
    version_dir = Path(version_dir)
    if precision == "auto":  # int8 where there is one: it holds float's accuracy (bench/quantize)
        precision = "int8" if (version_dir / INT8_FILE).is_file() else "float"
    if precision not in PRECISION_FILES:
        raise LoadError(f"unknown precision {precision!r}: {' or '.join(PRECISION_FILES)}",
                        version_dir)
    onnx_file = PRECISION_FILES[precision]
    onnx_path = version_dir / onnx_file
    if not onnx_path.is_file():
        if onnx_file == INT8_FILE:
            raise LoadError(f"no {INT8_FILE}: this version has no int8 model (make one with "
                            "`convnet export --quantize int8`, or serve in float)", version_dir)
        raise LoadError(f"no {ONNX_FILE}", version_dir)
    labels = _read(load_labels, LABELS_FILE, version_dir)
    metrics = _read(load_metrics, METRICS_FILE, version_dir)
    if not isinstance(metrics, dict):
        raise LoadError(f"{METRICS_FILE} must hold a JSON object", version_dir)
    config = _read(load_config, CONFIG_FILE, version_dir)

    resident_before = resident_bytes()
    options = ort.SessionOptions()
    options.intra_op_num_threads = inference_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only; a refused model is reported by us, with reason
    try:
        session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise LoadError(f"ONNX Runtime cannot load {onnx_file}", version_dir, exc) from None

    fixed_batch, size = _check_signature(
        session, {CONFIG_FILE: config, METRICS_FILE: metrics}, version_dir)
    calibration, rule = _read_calibration(version_dir, session)
    model = LoadedModel(
        session=session,
        input_name=session.get_inputs()[0].name,
        labels=labels,
        metrics=metrics,
        name=model_name(version_dir),
        version=version_number(version_dir),
        path=version_dir,
        fixed_batch=fixed_batch,
        input_size=size,
        unsure=rule,
        calibration=calibration,
        precision=precision,
    )
    _test_inference(model)
    grown = resident_bytes() - resident_before
    return dataclasses.replace(model, memory_bytes=max(grown, onnx_path.stat().st_size))


def _read(load, name: str, version_dir: Path):
    """load(version_dir), with any failure (missing, not UTF-8, not JSON, wrong shape) refused
    as `name` being missing or invalid."""
    try:
        return load(version_dir)
    except (ModelDirError, OSError, ValueError) as exc:
        raise LoadError(f"{name} is missing or invalid", version_dir, exc) from None


def _read_calibration(version_dir: Path, session: ort.InferenceSession):
    """calibration.json's content and its unsure rule, or (None, None) for a version without
    one (older versions, models never calibrated); a malformed one refuses the version."""
    path = version_dir / CALIBRATION_FILE
    if not path.is_file():
        return None, None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("it must hold a JSON object")
        rule = UnsureRule.from_json(record["unsure"]) if "unsure" in record else None
    except (OSError, ValueError, KeyError) as exc:
        raise LoadError(f"{CALIBRATION_FILE} is invalid", version_dir, exc) from None
    outputs = {o.name for o in session.get_outputs()}
    if rule is not None and rule.output is not None and rule.output not in outputs:
        raise LoadError(f"{CALIBRATION_FILE}'s unsure rule needs the graph output "
                        f"{rule.output!r}, which model.onnx lacks", version_dir)
    return record, rule
