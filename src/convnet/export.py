"""Export a Keras model to the formats servers load: ONNX (ours) and SavedModel (TF Serving).

Both take raw uint8 pixels [N, S, S, 3], S being the Keras model's fixed input size (32 for
CIFAR-10), and return class probabilities [N, C]; exported from a calibrated version, both return
softmax(logits / T) and the raw `logits` [N, C] too (convnet.calibrate). Needs the
`train` extra (TensorFlow, Keras, tf2onnx). An ONNX file is written only after it agrees with Keras,
and `export_version` never modifies a published version: it publishes the export as the next one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from convnet import calibrate, modeldir

INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
ONNX_TOLERANCE = 1e-4  # max |onnx - keras| over probabilities accepted at export


def _rename_io(onnx_model) -> None:
    """tf2onnx names the output after a TF op ("Identity:0"); give both ends stable names and a
    symbolic batch dimension."""
    graph = onnx_model.graph
    renames = {graph.input[0].name: INPUT_NAME, graph.output[0].name: OUTPUT_NAME}
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in (graph.input[0], graph.output[0]):
        value.name = renames[value.name]
        value.type.tensor_type.shape.dim[0].dim_param = "N"


class ExportError(ValueError):
    """An export that was refused or failed its check; nothing was written."""


def _input_size(model) -> int:
    """S of a Keras model taking uint8 [N, S, S, 3]; ExportError for any other input shape."""
    try:
        return modeldir.image_size(model.input_shape, {}, "the Keras model")
    except modeldir.ModelDirError as exc:
        raise ExportError(f"cannot export: {exc}") from None


def _onnx_input_shape(onnx_model) -> list:
    """The graph input's dimensions: ints where fixed, names (or None) where symbolic."""
    dims = onnx_model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


def export_onnx(model, path: str | os.PathLike, *, check_images: np.ndarray | None = None) -> float:
    """Write `model` (uint8 pixels -> probabilities) as ONNX at `path`, only once it agrees with
    Keras on `check_images` (random pixels if None) within ONNX_TOLERANCE; returns the max abs
    difference. A failed check raises ExportError and leaves `path` as it was."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    size = _input_size(model)
    if check_images is None:
        check_images = np.random.default_rng(0).integers(0, 256, (16, size, size, 3),
                                                         dtype=np.uint8)
    theirs = np.asarray(model(check_images, training=False))  # also builds a fresh model
    with tempfile.TemporaryDirectory(prefix="convnet-onnx-") as tmp:  # not where a server looks
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # tf2onnx probes numpy aliases
            model.export(str(raw), format="onnx", verbose=False)
        onnx_model = onnx.load(str(raw))
    _rename_io(onnx_model)
    onnx_shape = _onnx_input_shape(onnx_model)
    if onnx_shape[1:] != [size, size, 3]:  # servers need S fixed in the graph, as Keras has it
        raise ExportError(f"the ONNX export takes input shape {onnx_shape}, expected "
                          f"[N, {size}, {size}, 3] as the Keras model; {path} not written")
    onnx_model.doc_string = f"convnet {model.name}: uint8 pixels -> probabilities"
    onnx.checker.check_model(onnx_model)
    serialized = onnx_model.SerializeToString()

    # Checked from memory: nothing is on disk at `path` until the check has passed.
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    ours = session.run(None, {INPUT_NAME: check_images})[0]
    diff = float(np.abs(ours - theirs).max())
    if not diff <= ONNX_TOLERANCE:  # NaN fails too
        raise ExportError(f"ONNX export differs from Keras by {diff:.2e} > {ONNX_TOLERANCE}; "
                          f"{path} not written")
    modeldir.write_bytes_atomic(path, serialized)
    return diff


def logits_model(model):
    """The network before its final softmax: `model`'s input -> logits [N, C]. The softmax is a
    Softmax layer (models.with_softmax) or a layer's softmax activation (Dense(activation=...)),
    which is rebuilt without it, with the same weights. ExportError for any other head."""
    import keras

    last = model.layers[-1]
    if last.output is not model.output:
        raise ExportError("cannot export a calibrated model: its output is not its last layer's")
    if isinstance(last, keras.layers.Softmax) and last.axis in (-1, 1):
        return keras.Model(model.input, last.input, name=f"{model.name}_logits")
    if getattr(last, "activation", None) is keras.activations.softmax:
        head = type(last).from_config({**last.get_config(), "activation": "linear",
                                       "name": f"{last.name}_logits"})
        logits = head(last.input)
        head.set_weights(last.get_weights())
        return keras.Model(model.input, logits, name=f"{model.name}_logits")
    raise ExportError(f"cannot export a calibrated model: its last layer {last.name!r} is not a "
                      "softmax, so there are no logits to scale")


def export_saved_model(model, directory: str | os.PathLike, *,
                       temperature: float | None = None) -> Path:
    """Write a TensorFlow SavedModel whose `serving_default` signature takes uint8
    [N, S, S, 3] `pixels` and returns `probabilities`: what TF Serving loads from
    `<root>/<version>/`. Given a calibration temperature T, `probabilities` are
    softmax(logits / T) and the raw `logits` are a second output, as in a calibrated
    model.onnx. Files are staged in a temporary folder and moved in at the end."""
    import tensorflow as tf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    size = _input_size(model)
    network = model if temperature is None else logits_model(model)

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8,
                                                name=INPUT_NAME)])
    def serve(pixels):
        if temperature is None:
            return {OUTPUT_NAME: network(pixels, training=False)}
        logits = tf.cast(network(pixels, training=False), tf.float32)  # (N, C)
        return {OUTPUT_NAME: tf.nn.softmax(logits / temperature, axis=-1),
                calibrate.LOGITS_OUTPUT: logits}

    module = tf.Module()
    module.model = network  # the variables the signature reads
    module.serve = serve
    staged = Path(tempfile.mkdtemp(dir=directory, prefix=".saved_model-"))
    try:
        tf.saved_model.save(module, str(staged), signatures={"serving_default": serve})
        for item in staged.iterdir():
            target = directory / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return directory


def _inside_published_version(path: Path) -> Path | None:
    """The published version folder (an integer-named model folder) that `path` is or lies
    in, if any."""
    for folder in (path, *path.parents):
        if folder.name.isdigit() and modeldir.is_version_dir(folder):
            return folder
    return None


def _write(model, fmt: str, target: Path, temperature: float | None) -> float | None:
    """Export into `target` (a file for ONNX, a folder for SavedModel), calibrated by
    `temperature` if given; the ONNX check's difference, or None."""
    if fmt == "saved_model":
        export_saved_model(model, target, temperature=temperature)
        return None
    diff = export_onnx(model, target)
    if temperature is not None:  # checked uncalibrated against Keras, then T goes in
        modeldir.write_bytes_atomic(
            target, calibrate.with_logits_output(target.read_bytes(), temperature))
    return diff


def export_version(model_dir: str | os.PathLike | None, fmt: str,
                   out: str | os.PathLike | None = None, *,
                   int8_data: str | os.PathLike | None = None) -> Path:
    """Export a version folder's model.keras as `fmt` ("onnx" or "saved_model"); return what was
    written. A published version is never changed: without `out`, the export goes into a copy
    of the version published as the root's next version (where servers polling the root pick
    it up whole); an `out` inside a published version is refused.

    int8_data: a dataset whose training images calibrate a statically quantized copy,
    model.int8.onnx beside model.onnx (`convnet.quantize`; ONNX only)."""
    import keras

    import convnet.models  # noqa: F401  registers custom objects for loading

    if fmt not in ("onnx", "saved_model"):
        raise ExportError(f"unknown format {fmt!r}: onnx or saved_model")
    if int8_data is not None and fmt != "onnx":
        raise ExportError("int8 quantization needs --format onnx")
    vdir = modeldir.resolve_version(model_dir)
    source = vdir / modeldir.KERAS_FILE
    if not source.is_file():
        raise modeldir.ModelDirError(f"{vdir} has no {modeldir.KERAS_FILE} to export from")
    target = Path(out) if out is not None else None
    if target is not None and (published := _inside_published_version(target.absolute())):
        raise ExportError(f"{target} is inside the published version {published}, which is "
                          f"never modified; leave out --out to publish the export as the next "
                          f"version, or write elsewhere")
    model = keras.models.load_model(source, compile=False)
    size = modeldir.version_image_size(vdir, model.input_shape, modeldir.KERAS_FILE)  # or refuse
    # model.keras is the network as trained; a calibrated version's temperature goes back in.
    temperature = _calibration_temperature(vdir)
    calibration = _calibration_images(int8_data, size) if int8_data is not None else None
    if target is None and not vdir.name.isdigit():  # a lone folder, not a version a server polls
        target = vdir / modeldir.ONNX_FILE if fmt == "onnx" else vdir
    if target is not None:
        _write(model, fmt, target, temperature)
        if calibration is not None:
            from convnet import quantize

            if target == vdir / modeldir.ONNX_FILE:  # a lone folder: record it in metrics.json
                quantize.add_int8(vdir, calibration,
                                  source=f"{int8_data} (train, {len(calibration)} images)")
            else:
                modeldir.write_bytes_atomic(
                    target.with_name(f"{target.stem}.int8.onnx"),
                    quantize.quantize_model(target.read_bytes(), calibration))
        return target
    root = vdir.parent
    staged = modeldir.staging_dir(root)
    try:
        shutil.copytree(vdir, staged, dirs_exist_ok=True)
        diff = _write(model, fmt, staged / modeldir.ONNX_FILE if fmt == "onnx" else staged,
                      temperature)
        if calibration is not None:
            from convnet import quantize

            quantize.add_int8(staged, calibration,
                              source=f"{int8_data} (train, {len(calibration)} images)")
        metrics = modeldir.load_metrics(staged)
        metrics["exported_from"] = int(vdir.name)
        if diff is not None:
            metrics["onnx_max_abs_diff"] = diff
        modeldir.write_json_atomic(staged / modeldir.METRICS_FILE, metrics)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    published = modeldir.publish(root, staged)
    return published / modeldir.ONNX_FILE if fmt == "onnx" else published


def _calibration_images(path: str | os.PathLike, size: int):
    """A class-balanced sample of the dataset's training images at S = `size`, (N, S, S, 3)
    uint8: what sets an int8 model's activation ranges."""
    from convnet import data, quantize

    train = data.load_dataset(path, size=size).get("train")
    if train is None:
        raise ExportError(f"{path} has no training images to calibrate the int8 model on")
    return train.images[quantize.calibration_sample(train.labels)]


def _calibration_temperature(version_dir: Path) -> float | None:
    """The temperature in a calibrated version's calibration.json, or None when there is none.
    A calibrated version's model.onnx has it, and its logits output, in the graph; model.keras
    is the network as trained, so every export from it must put them back."""
    from convnet.calibration import CALIBRATION_FILE

    record = modeldir.read_json(version_dir / CALIBRATION_FILE, default={})
    temperature = record.get("temperature") if isinstance(record, dict) else None
    if not isinstance(temperature, int | float) or isinstance(temperature, bool):
        return None
    if not (np.isfinite(temperature) and temperature > 0):
        raise ExportError(f"{version_dir / CALIBRATION_FILE} has temperature {temperature}; "
                          "it must be a positive number")
    return float(temperature)
