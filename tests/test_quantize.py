"""int8 export and serving: `convnet export --quantize int8` writes model.int8.onnx beside
model.onnx, the server serves it when asked, and refuses clearly when a version has none."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import image_bytes
from synthetic import CLASSES, make_images, write_cifar_batches

from convnet import calibrate, modeldir, quantize
from convnet.calibration import softmax
from convnet.cli import main
from convnet.serve.model import LoadError, load_model

keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")


def small_convnet() -> keras.Model:
    """uint8 pixels -> 10 classes through two convolutions: the first stays float (the stem),
    the second is quantized. Fitted briefly, so its answers are decisive, not noise."""
    keras.utils.set_random_seed(0)
    pixels = keras.Input((32, 32, 3), dtype="uint8", name="pixels")
    x = keras.layers.Rescaling(1 / 255)(pixels)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(pixels, keras.layers.Dense(10, activation="softmax")(x))
    images, labels = make_images(200, seed=5)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=8, batch_size=50, verbose=0)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(version 2 published by `convnet export --quantize int8`, the data folder)."""
    tmp = tmp_path_factory.mktemp("int8")
    data = write_cifar_batches(tmp / "cifar")
    version = tmp / "models" / "shapes" / "1"
    version.mkdir(parents=True)
    small_convnet().save(version / modeldir.KERAS_FILE)
    modeldir.write_json_atomic(version / modeldir.LABELS_FILE, CLASSES)
    modeldir.write_json_atomic(version / modeldir.METRICS_FILE, {"accuracy": 0.5})
    result = CliRunner().invoke(main, ["export", "--model", str(version.parent),
                                       "--quantize", "int8", "--data", str(data)])
    assert result.exit_code == 0, result.output
    return version.parent / "2", data


def probabilities(path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"pixels": images})[0]


def test_export_writes_an_int8_model_that_agrees_with_float(exported):
    version, _ = exported
    int8 = onnx.load(str(version / modeldir.INT8_FILE))
    ops = {node.op_type for node in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in int8.graph.initializer)
    onnx.checker.check_model(int8)
    images, _ = make_images(100, seed=9)
    ours = probabilities(version / modeldir.INT8_FILE, images)
    theirs = probabilities(version / modeldir.ONNX_FILE, images)
    assert ours.shape == theirs.shape == (100, 10)
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.9
    record = modeldir.load_metrics(version)["int8"]
    assert record["file"] == modeldir.INT8_FILE and record["calibration_images"] == 100


def test_export_out_writes_the_int8_model_beside_it(exported, tmp_path):
    version, data = exported
    out = tmp_path / "elsewhere" / "model.onnx"
    result = CliRunner().invoke(main, ["export", "--model", str(version.parent / "1"), "--out",
                                       str(out), "--quantize", "int8", "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (out.parent / modeldir.INT8_FILE).is_file()


def test_temperature_and_logits_survive_quantization(exported):
    version, _ = exported
    calibrated = calibrate.with_logits_output((version / modeldir.ONNX_FILE).read_bytes(), 1.7)
    images, _ = make_images(50, seed=3)
    int8 = onnx.load_from_string(quantize.quantize_model(calibrated, images))
    assert [o.name for o in int8.graph.output] == ["probabilities", calibrate.LOGITS_OUTPUT]
    divide = [n for n in int8.graph.node if n.op_type == "Div"]
    assert any(calibrate.TEMPERATURE_NODE in n.input for n in divide)
    session = ort.InferenceSession(int8.SerializeToString(), providers=["CPUExecutionProvider"])
    probs, logits = session.run(None, {"pixels": images})
    np.testing.assert_allclose(probs, softmax(logits, 1.7), atol=1e-5)


def test_the_server_serves_the_int8_model(exported):
    from convnet.serve import create_app

    version, _ = exported
    app = create_app({"MODEL_DIR": str(version), "RELOAD_INTERVAL": 0, "TESTING": True,
                      "PRECISION": "int8"})
    client = app.test_client()
    assert client.get("/readyz").get_json()["model"]["precision"] == "int8"
    reply = client.post("/api/v1/predict",
                        data={"file": (io.BytesIO(image_bytes()), "red.png")})
    assert reply.status_code == 200, reply.get_json()
    assert len(reply.get_json()["predictions"]) == 1


def test_a_version_without_int8_is_refused_clearly(model_root):
    with pytest.raises(LoadError, match="no model.int8.onnx") as refused:
        load_model(model_root / "1", precision="int8")
    assert "convnet export --quantize int8" in refused.value.reason
    result = CliRunner().invoke(main, ["serve", "--model", str(model_root),
                                       "--precision", "int8", "--port", "0"])
    assert result.exit_code == 2
    assert "has no model.int8.onnx" in result.output


def test_quantize_without_data_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["export", "--model", str(tmp_path), "--quantize", "int8"])
    assert result.exit_code == 2
    assert "needs --data" in result.output
