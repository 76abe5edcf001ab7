"""Export (convnet.export): nothing is written before the ONNX check passes, and a published
version is never modified."""

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")
from convnet import export, modeldir  # noqa: E402
from convnet.cli import main  # noqa: E402


def tiny_model() -> keras.Model:
    """uint8 pixels -> probabilities over 3 classes, small enough to export in a second."""
    keras.utils.set_random_seed(0)
    pixels = keras.Input((32, 32, 3), dtype="uint8", name="pixels")
    x = keras.layers.Rescaling(1 / 255)(pixels)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(pixels, keras.layers.Dense(3, activation="softmax")(x))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A model root with version 1 holding model.keras and no model.onnx, as a JAX run leaves."""
    root = tmp_path_factory.mktemp("export") / "shapes"
    version = root / "1"
    version.mkdir(parents=True)
    tiny_model().save(version / modeldir.KERAS_FILE)
    modeldir.write_json_atomic(version / modeldir.LABELS_FILE, ["a", "b", "c"])
    modeldir.write_json_atomic(version / modeldir.METRICS_FILE, {"accuracy": 0.5})
    return root


def digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_check_leaves_the_existing_file(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the good export")
    monkeypatch.setattr(export, "ONNX_TOLERANCE", -1.0)  # every export now fails its check
    with pytest.raises(export.ExportError, match="not written"):
        export.export_onnx(tiny_model(), target)
    assert target.read_bytes() == b"the good export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left either


def test_a_passed_check_replaces_the_file(tmp_path):
    from convnet.evaluate import onnx_session

    target = tmp_path / "model.onnx"
    target.write_bytes(b"an old export")
    assert export.export_onnx(tiny_model(), target) <= export.ONNX_TOLERANCE
    out = onnx_session(target).run(None, {"pixels": np.zeros((2, 32, 32, 3), np.uint8)})[0]
    assert out.shape == (2, 3)


def test_exporting_a_published_version_publishes_the_next_one(root):
    before = digest(root / "1")
    result = CliRunner().invoke(main, ["export", "--model", str(root), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(root / "2" / "model.onnx")
    assert digest(root / "1") == before  # untouched: no model.onnx appears in it
    new = root / "2"
    assert (new / "model.onnx").is_file() and modeldir.load_labels(new) == ["a", "b", "c"]
    metrics = json.loads((new / "metrics.json").read_text())
    assert metrics["exported_from"] == 1 and metrics["onnx_max_abs_diff"] <= 1e-4
    assert metrics["accuracy"] == 0.5
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging left


def test_out_inside_a_published_version_is_refused(root):
    before = digest(root / "1")
    result = CliRunner().invoke(main, ["export", "--model", str(root / "1"),
                                       "--out", str(root / "1" / "model.onnx")])
    assert result.exit_code == 2
    assert "published version" in result.output and "never modified" in result.output
    assert digest(root / "1") == before


def coloured_images(n: int, seed: int = 0) -> np.ndarray:
    """Solid random colours with a little noise, (n, 32, 32, 3) uint8: the tiny model's average
    pooling sees n different inputs, so its answers vary."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 236, (n, 1, 1, 3))
    return (colours + rng.integers(0, 20, (n, 32, 32, 3))).astype(np.uint8)


def serving_outputs(folder, images) -> dict[str, np.ndarray]:
    tf = pytest.importorskip("tensorflow")
    signature = tf.saved_model.load(str(folder)).signatures["serving_default"]
    return {k: v.numpy() for k, v in signature(pixels=tf.constant(images)).items()}


def test_a_calibrated_version_exports_a_calibrated_saved_model(tmp_path):
    import onnxruntime as ort

    from convnet import calibrate
    from convnet.calibration import CALIBRATION_FILE

    root = tmp_path / "shapes"
    (root / "1").mkdir(parents=True)
    model = tiny_model()
    model.save(root / "1" / modeldir.KERAS_FILE)
    modeldir.write_json_atomic(root / "1" / modeldir.LABELS_FILE, ["a", "b", "c"])
    plain_onnx = export.export_version(root, "onnx")  # version 2
    images = coloured_images(300)
    labels = np.asarray(model(images)).argmax(1)
    flip = np.random.default_rng(1).random(len(labels)) < 0.1  # so T stays finite
    labels[flip] = (labels[flip] + 1) % 3
    calibrated = calibrate.calibrate_version(plain_onnx.parent, images, labels)  # version 3
    temperature = json.loads((calibrated / CALIBRATION_FILE).read_text())["temperature"]
    assert abs(temperature - 1) > 0.05  # a test that T is applied, not a T of 1

    saved = export.export_version(calibrated, "saved_model")  # version 4
    assert saved == root / "4" and (saved / "saved_model.pb").is_file()
    check = coloured_images(8, seed=2)
    ours = serving_outputs(saved, check)
    session = ort.InferenceSession(str(calibrated / modeldir.ONNX_FILE),
                                   providers=["CPUExecutionProvider"])
    probs, logits = session.run(["probabilities", "logits"], {"pixels": check})
    assert sorted(ours) == ["logits", "probabilities"]
    np.testing.assert_allclose(ours["probabilities"], probs, atol=1e-5)
    np.testing.assert_allclose(ours["logits"], logits, atol=1e-5)
    uncalibrated = np.asarray(model(check))
    assert np.abs(ours["probabilities"] - uncalibrated).max() > 1e-3
    assert np.array_equal(ours["probabilities"].argmax(1), uncalibrated.argmax(1))
    # The version it was made from (no calibration.json) exports as before: probabilities only.
    plain = serving_outputs(export.export_version(root / "1", "saved_model"), check)
    assert list(plain) == ["probabilities"]
    np.testing.assert_allclose(plain["probabilities"], uncalibrated, atol=1e-6)


def test_logits_model_undoes_a_softmax_layer_and_refuses_other_heads():
    from convnet import models

    keras.utils.set_random_seed(0)
    pixels = keras.Input((32, 32, 3), dtype="uint8", name="pixels")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(pixels))
    net = keras.Model(pixels, keras.layers.Dense(3)(x))
    images = coloured_images(4)
    np.testing.assert_allclose(export.logits_model(models.with_softmax(net))(images),
                               net(images), atol=1e-6)
    with pytest.raises(export.ExportError, match="no logits"):
        export.logits_model(net)
