"""Export a Keras model to the formats servers load: ONNX (ours) and SavedModel (TF Serving).

Both take raw uint8 pixels [N, 32, 32, 3] and return class probabilities [N, C]. Needs the
`train` extra (TensorFlow, Keras, tf2onnx).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from convnet import modeldir

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


def export_onnx(model, path: str | os.PathLike, *, check_images: np.ndarray | None = None) -> float:
    """Write `model` (uint8 pixels -> probabilities) as ONNX at `path`, atomically.
    Returns the max abs difference to Keras on `check_images` (random pixels if None)."""
    import onnx

    path = Path(path)
    if check_images is None:
        check_images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    theirs = np.asarray(model(check_images, training=False))  # also builds a fresh model
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # tf2onnx probes numpy aliases
            model.export(str(raw), format="onnx", verbose=False)
        onnx_model = onnx.load(str(raw))
        _rename_io(onnx_model)
        onnx_model.doc_string = f"convnet {model.name}: uint8 pixels -> probabilities"
        onnx.checker.check_model(onnx_model)
        modeldir.write_bytes_atomic(path, onnx_model.SerializeToString())

    from convnet.evaluate import onnx_session

    session = onnx_session(path)
    ours = session.run(None, {INPUT_NAME: check_images})[0]
    diff = float(np.abs(ours - theirs).max())
    if diff > ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX export differs from Keras by {diff:.2e} > {ONNX_TOLERANCE}")
    return diff


def export_saved_model(model, directory: str | os.PathLike) -> Path:
    """Write a TensorFlow SavedModel whose `serving_default` signature takes uint8
    [N, 32, 32, 3] `pixels` and returns `probabilities`: what TF Serving loads from
    `<root>/<version>/`. Files are staged in a temporary folder and moved in at the end."""
    import tensorflow as tf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8, name=INPUT_NAME)])
    def serve(pixels):
        return {OUTPUT_NAME: model(pixels, training=False)}

    module = tf.Module()
    module.model = model
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


def export_version(model_dir: str | os.PathLike | None, fmt: str,
                   out: str | os.PathLike | None = None) -> Path:
    """Re-export a version folder's model.keras as `fmt` ("onnx" or "saved_model")."""
    import keras

    import convnet.models  # noqa: F401  registers custom objects for loading

    vdir = modeldir.resolve_version(model_dir)
    source = vdir / modeldir.KERAS_FILE
    if not source.is_file():
        raise modeldir.ModelDirError(f"{vdir} has no {modeldir.KERAS_FILE} to export from")
    model = keras.models.load_model(source, compile=False)
    if fmt == "onnx":
        target = Path(out) if out else vdir / modeldir.ONNX_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(model, target)
        return target
    if fmt == "saved_model":
        return export_saved_model(model, Path(out) if out else vdir)
    raise ValueError(f"unknown format {fmt!r}: onnx or saved_model")
