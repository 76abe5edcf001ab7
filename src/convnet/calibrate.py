"""Calibrate a model version after training: fit a temperature and an unsure rule on images its
weights never saw, put the temperature inside model.onnx, and publish the result as the root's
next version (a published version is never modified).

    convnet calibrate --model ROOT --data PATH [--split test] [--fit-fraction 0.5]

What changes in the graph: the softmax that produces `probabilities` now takes logits / T, and
the raw logits become a second output, `logits` (the unsure rule's energy score needs them; TF
Serving and V2 clients keep getting `probabilities` first). Labels, accuracy and the argmax are
untouched. calibration.json and reliability.png are written beside it; metrics.json gains `ece`.

The images: `fit` (a stratified `fit_fraction` of the given split) fits the temperature and the
unsure threshold; the rest (`report`) measures the calibration error before and after. Neither
may have been used to train the weights: pass a held-out split (the test split of a model trained
on the train split, or data kept apart).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convnet import calibration, modeldir
from convnet.calibration import CALIBRATION_FILE, RELIABILITY_FILE, UnsureRule

LOGITS_OUTPUT = "logits"
TEMPERATURE_NODE = "calibration_temperature"
FLAG_RATE = 0.05  # share of correct validation answers the unsure rule may flag


class CalibrationError(ValueError):
    """A calibration request that cannot run, with the reason."""


@dataclass
class Outputs:
    probs: np.ndarray  # (N, C) softmax of the uncalibrated logits
    logits: np.ndarray  # (N, C)


def split_for_fitting(labels: np.ndarray, fraction: float, seed: int = 0):
    """Indices (fit, report): `fraction` of each class to fit on, the rest to report on."""
    if not 0 < fraction < 1:
        raise CalibrationError(f"--fit-fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    fit: list[int] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fit.extend(members[: max(1, int(round(len(members) * fraction)))])
    mask = np.zeros(len(labels), bool)
    mask[fit] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def with_logits_output(model_bytes: bytes, temperature: float | None = None) -> bytes:
    """The ONNX graph with its logits (the softmax's input) as a second output `logits`, and,
    given a temperature, logits / T fed to the softmax instead."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    probs_name = graph.output[0].name
    if any(o.name == LOGITS_OUTPUT for o in graph.output):
        raise CalibrationError("the model is calibrated already (its graph has a logits "
                               "output); calibrate the version it was made from")
    softmax = [n for n in graph.node if probs_name in n.output]
    if len(softmax) != 1 or softmax[0].op_type != "Softmax":
        raise CalibrationError(f"the graph's output {probs_name!r} does not come from a Softmax "
                               "node, so there are no logits to scale")
    node = softmax[0]
    logits = node.input[0]
    if temperature is not None:
        scaled = f"{logits}/{TEMPERATURE_NODE}"
        graph.initializer.append(
            numpy_helper.from_array(np.array(temperature, np.float32), TEMPERATURE_NODE))
        divide = helper.make_node("Div", [logits, TEMPERATURE_NODE], [scaled],
                                  name=f"{TEMPERATURE_NODE}_div")
        graph.node.insert(list(graph.node).index(node), divide)
        node.input[0] = scaled
    num_classes = graph.output[0].type.tensor_type.shape.dim[1]
    batch = graph.output[0].type.tensor_type.shape.dim[0]
    if logits != LOGITS_OUTPUT:  # expose it under the contract's name
        if any(LOGITS_OUTPUT in n.output for n in graph.node):
            raise CalibrationError(f"the graph has a tensor named {LOGITS_OUTPUT!r} that is not "
                                   "the softmax's input")
        graph.node.append(helper.make_node("Identity", [logits], [LOGITS_OUTPUT],
                                           name="logits_out"))
    graph.output.append(helper.make_tensor_value_info(
        LOGITS_OUTPUT, onnx.TensorProto.FLOAT,
        [batch.dim_param or batch.dim_value, num_classes.dim_param or num_classes.dim_value]))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def run_with_logits(model_bytes: bytes, images: np.ndarray, batch: int = 256) -> Outputs:
    """Probabilities and logits of the (uncalibrated) graph for uint8 images."""
    import onnxruntime as ort

    session = ort.InferenceSession(with_logits_output(model_bytes),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    probs, logits = [], []
    for i in range(0, len(images), batch):
        p, lg = session.run(None, {name: images[i : i + batch]})
        probs.append(p)
        logits.append(lg)
    return Outputs(np.concatenate(probs), np.concatenate(logits))


def fit(fit_out: Outputs, fit_labels: np.ndarray, report_out: Outputs, report_labels: np.ndarray,
        flag_rate: float = FLAG_RATE) -> dict:
    """Temperature and unsure rule from the `fit` images; ECE before and after on the `report`
    ones. Returns calibration.json's content."""
    t = calibration.fit_temperature(fit_out.logits, fit_labels)
    correct = fit_out.logits.argmax(1) == fit_labels
    energy = calibration.unsure_scores("energy", fit_out.probs, fit_out.logits)
    try:
        rule = UnsureRule.fit("energy", energy[correct], flag_rate, output=LOGITS_OUTPUT)
    except ValueError as exc:
        raise CalibrationError(f"cannot set the unsure rule: {exc}") from None
    after = calibration.softmax(report_out.logits, t)
    return {
        "temperature": t,
        "ece": {"before": calibration.expected_calibration_error(report_out.probs, report_labels),
                "after": calibration.expected_calibration_error(after, report_labels),
                "bins": calibration.ECE_BINS},
        "fit_images": int(len(fit_labels)),
        "report_images": int(len(report_labels)),
        "unsure": rule.to_json(),
    }


def _rows(outputs: Outputs, idx: np.ndarray) -> Outputs:
    return Outputs(outputs.probs[idx], outputs.logits[idx])


def calibrate_into(version_dir: Path, fit_images: np.ndarray, fit_labels: np.ndarray,
                   report_images: np.ndarray, report_labels: np.ndarray, **facts) -> dict:
    """Calibrate the (unpublished) version folder in place: model.onnx gets the temperature and
    the logits output; calibration.json (with `facts`), reliability.png and metrics.json's `ece`
    are written. The fit images must be ones the weights never saw; the report images, ones
    neither the weights nor the fit saw. Returns calibration.json's content."""
    onnx_path = version_dir / modeldir.ONNX_FILE
    model_bytes = onnx_path.read_bytes()
    fit_out = run_with_logits(model_bytes, fit_images)
    report_out = run_with_logits(model_bytes, report_images)
    record = {**fit(fit_out, fit_labels, report_out, report_labels), **facts}
    t = record["temperature"]
    modeldir.write_bytes_atomic(onnx_path, with_logits_output(model_bytes, t))
    modeldir.write_json_atomic(version_dir / CALIBRATION_FILE, record)
    calibration.plot_reliability(
        report_labels,
        {"before": report_out.probs,
         f"after (T = {t:.3f})": calibration.softmax(report_out.logits, t)},
        version_dir / RELIABILITY_FILE,
        title=f"{len(report_labels)} images not used to fit T")
    metrics = modeldir.load_metrics(version_dir)
    metrics["ece"], metrics["temperature"] = record["ece"], t
    modeldir.write_json_atomic(version_dir / modeldir.METRICS_FILE, metrics)
    return record


def calibrate_version(model_dir: str | os.PathLike | None, images: np.ndarray,
                      labels: np.ndarray, *, fit_fraction: float = 0.5, seed: int = 0,
                      source: str = "", out_root: str | os.PathLike | None = None) -> Path:
    """Calibrate the version `model_dir` resolves to on (images, labels), which its weights
    never saw: `fit_fraction` of each class fits, the rest reports. Publishes the result as the
    next version of `out_root` (default: the version's own root); returns its folder."""
    vdir = modeldir.resolve_version(model_dir)
    if not (vdir / modeldir.ONNX_FILE).is_file():
        raise CalibrationError(f"{vdir} has no {modeldir.ONNX_FILE}; run convnet export first")
    if (vdir / CALIBRATION_FILE).is_file():
        raise CalibrationError(f"{vdir} is calibrated already; calibrate the version it was "
                               "made from")
    classes = modeldir.load_labels(vdir)
    if labels.max(initial=0) >= len(classes):
        raise CalibrationError(f"the data has labels beyond the model's {len(classes)} classes")
    fit_idx, report_idx = split_for_fitting(labels, fit_fraction, seed)
    root = Path(out_root) if out_root is not None else vdir.parent
    staged = modeldir.staging_dir(root)
    try:
        for item in vdir.iterdir():
            if item.name.startswith("."):
                continue
            # model.keras stays the network as trained; `convnet export` puts the temperature
            # back into any model.onnx it makes from it (calibration.json says which).
            if item.is_dir():
                shutil.copytree(item, staged / item.name)
            else:
                shutil.copy2(item, staged / item.name)
        calibrate_into(staged, images[fit_idx], labels[fit_idx], images[report_idx],
                       labels[report_idx], calibrated_from=modeldir.version_number(vdir),
                       data=source, fit_fraction=fit_fraction, seed=seed)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return modeldir.publish(root, staged)


def summary(version_dir: Path) -> str:
    record = json.loads((version_dir / CALIBRATION_FILE).read_text())
    rule = record["unsure"]
    return (f"{version_dir}: temperature {record['temperature']:.4f}; ECE "
            f"{record['ece']['before']:.4f} -> {record['ece']['after']:.4f} on "
            f"{record['report_images']} images not used to fit it; unsure when the energy score "
            f"exceeds {rule['threshold']:.3f} ({rule['flag_rate']:.0%} of correct answers on the "
            f"{record['fit_images']} fitting images)")
