"""Calibration and "not sure": temperature fitting, ECE, the calibrated graph, publishing a
calibrated version, and the unsure rule end to end through the server."""

import io
import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import CIFAR10_LABELS, TINY_WEIGHTS, build_tiny_onnx, write_version
from PIL import Image

from convnet import calibrate, calibration
from convnet.calibration import UnsureRule
from convnet.cli import main


def sample_labels(logits: np.ndarray, temperature: float, seed: int = 0) -> np.ndarray:
    """Labels drawn from softmax(logits / T): a model whose calibrated temperature is T."""
    probs = calibration.softmax(logits, temperature)
    u = np.random.default_rng(seed).random(len(probs))[:, None]
    return (probs.cumsum(1) < u).sum(1)


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(true_t):
    logits = np.random.default_rng(1).normal(0, 3, (20_000, 10))
    labels = sample_labels(logits, true_t)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_temperature_scaling_fixes_the_calibration_error_and_keeps_the_argmax():
    logits = np.random.default_rng(2).normal(0, 3, (20_000, 10))
    labels = sample_labels(logits, 0.5, seed=3)
    before = calibration.softmax(logits)
    t = calibration.fit_temperature(logits[:10_000], labels[:10_000])
    after = calibration.softmax(logits, t)
    assert np.array_equal(before.argmax(1), after.argmax(1))
    ece_before = calibration.expected_calibration_error(before[10_000:], labels[10_000:])
    ece_after = calibration.expected_calibration_error(after[10_000:], labels[10_000:])
    assert ece_before > 0.1 and ece_after < 0.02


def test_ece_of_known_bins():
    # 10 images at confidence 0.9, 6 of them right: one bin, |0.6 - 0.9| = 0.3.
    probs = np.tile([[0.9, 0.1]], (10, 1))
    labels = np.array([0] * 6 + [1] * 4)
    assert calibration.expected_calibration_error(probs, labels) == pytest.approx(0.3)
    # Two bins of 5: confidence 0.55 all right (0.45 off), 0.95 all right (0.05 off).
    probs = np.array([[0.55, 0.45]] * 5 + [[0.95, 0.05]] * 5)
    assert calibration.expected_calibration_error(probs, np.zeros(10, int)) == pytest.approx(0.25)


def test_unsure_rule_flags_the_chosen_share_and_survives_json():
    scores = np.random.default_rng(4).normal(0, 1, 10_000)
    rule = UnsureRule.fit("energy", scores, 0.05, output="logits")
    assert np.mean(rule.unsure(scores)) == pytest.approx(0.05, abs=0.005)
    confidence = rule.confidence(np.array([-10.0, 0.0, 10.0]))
    assert confidence[0] == 1.0 and confidence[1] == pytest.approx(0.5, abs=0.02)
    assert confidence[2] == 0.0
    assert UnsureRule.from_json(json.loads(json.dumps(rule.to_json()))) == rule


@pytest.mark.parametrize("bad, reason", [
    ({"score": "vibes"}, "not one of"),
    ({"score": "energy", "output": None}, "needs unsure.output"),
    ({"flag_rate": 1.5}, "between 0 and 1"),
    ({"reference": [3, 2, 1]}, "rising"),
])
def test_malformed_rules_are_refused_with_the_reason(bad, reason):
    good = UnsureRule.fit("energy", np.arange(100.0), output="logits").to_json()
    with pytest.raises(ValueError, match=reason):
        UnsureRule.from_json({**good, **bad})


def test_calibrated_graph_divides_logits_by_t_and_exposes_them():
    model = build_tiny_onnx(TINY_WEIGHTS[1])
    pixels = np.random.default_rng(5).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    plain = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    calibrated = ort.InferenceSession(calibrate.with_logits_output(model, 0.5),
                                      providers=["CPUExecutionProvider"])
    (probs,) = plain.run(None, {"pixels": pixels})
    new_probs, logits = calibrated.run(None, {"pixels": pixels})
    assert [o.name for o in calibrated.get_outputs()] == ["probabilities", "logits"]
    np.testing.assert_allclose(calibration.softmax(logits), probs, atol=1e-6)
    np.testing.assert_allclose(calibration.softmax(logits, 0.5), new_probs, atol=1e-6)
    assert np.array_equal(probs.argmax(1), new_probs.argmax(1))
    with pytest.raises(calibrate.CalibrationError, match="calibrated already"):
        calibrate.with_logits_output(calibrate.with_logits_output(model, 0.5), 0.5)


def bright_primaries(n: int, seed: int = 0, size: int = 32):
    """Solid, bright red, green or blue images (the tiny model's three classes) with a little
    noise; 10% get a random label, so the fitted temperature stays finite."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = np.zeros((n, size, size, 3), np.uint8)
    for i, c in enumerate(labels):
        images[i, :, :, c] = rng.integers(220, 256)
    images = np.clip(images + rng.integers(0, 20, images.shape), 0, 255).astype(np.uint8)
    flip = rng.random(n) < 0.1
    labels[flip] = rng.integers(0, 3, flip.sum())
    return images, labels


@pytest.fixture(scope="module")
def calibrated_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated") / "cifar10"
    write_version(root, 1)
    images, labels = bright_primaries(600)
    version = calibrate.calibrate_version(root / "1", images, labels, source="synthetic")
    return root, version


def test_calibrating_publishes_a_new_version_and_leaves_the_old(calibrated_root):
    root, version = calibrated_root
    assert version == root / "2"
    assert not (root / "1" / calibration.CALIBRATION_FILE).exists()
    record = json.loads((version / calibration.CALIBRATION_FILE).read_text())
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["ece"] == record["ece"] and metrics["accuracy"] == 0.4321
    assert record["fit_images"] + record["report_images"] == 600
    assert abs(record["fit_images"] - 300) <= 3  # half of each class, rounded
    assert record["ece"]["after"] < record["ece"]["before"]
    assert Image.open(version / calibration.RELIABILITY_FILE).size[0] > 100
    with pytest.raises(calibrate.CalibrationError, match="calibrated already"):
        calibrate.calibrate_version(version, *bright_primaries(60))


def post_images(client, images):
    files = []
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        files.append((io.BytesIO(buffer.getvalue()), f"{i}.png"))
    return client.post("/api/v1/predict", data={"file": files},
                       content_type="multipart/form-data")


def test_noise_is_unsure_and_bright_primaries_are_not(calibrated_root):
    from convnet.serve import create_app

    root, _ = calibrated_root
    client = create_app({"MODEL_DIR": str(root), "RELOAD_INTERVAL": 0}).test_client()
    noise = np.random.default_rng(6).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    familiar, _ = bright_primaries(6, seed=7)
    answer = post_images(client, np.concatenate([noise, familiar]))
    assert answer.status_code == 200, answer.get_json()
    predictions = answer.get_json()["predictions"]
    assert [p["unsure"] for p in predictions] == [True] * 6 + [False] * 6
    assert all(0 <= p["confidence"] <= 1 for p in predictions)
    assert max(p["confidence"] for p in predictions[:6]) < 0.05
    # The page (no JavaScript) says so too.
    page = client.post("/", data={"file": [(io.BytesIO(_png(noise[0])), "noise.png")]},
                       content_type="multipart/form-data")
    assert page.status_code == 200 and b"Not sure: this may be none of these classes" in page.data


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_model_without_calibration_answers_without_the_fields(client, red_png):
    answer = client.post("/api/v1/predict", data=red_png, content_type="image/png")
    (prediction,) = answer.get_json()["predictions"]
    assert "unsure" not in prediction and "confidence" not in prediction


def test_a_broken_calibration_file_refuses_the_version(tmp_path, calibrated_root):
    from convnet.serve.model import LoadError, load_model

    _, good = calibrated_root
    version = write_version(tmp_path / "m", 1,
                            onnx_bytes=(good / "model.onnx").read_bytes())
    (version / calibration.CALIBRATION_FILE).write_text('{"unsure": {"score": "vibes"}}')
    with pytest.raises(LoadError) as refused:
        load_model(version)
    assert refused.value.reason == "calibration.json is invalid"
    # A rule whose graph lacks the logits output is refused too.
    plain = write_version(tmp_path / "n", 1)
    (plain / calibration.CALIBRATION_FILE).write_text(
        (good / calibration.CALIBRATION_FILE).read_text())
    with pytest.raises(LoadError, match="lacks"):
        load_model(plain)


def test_calibrate_command(tmp_path):
    classes = CIFAR10_LABELS[:3]  # the tiny model's red, green and blue classes
    root = tmp_path / "three"
    write_version(root, 1, weights=TINY_WEIGHTS[1][:, :3], labels=classes)
    images, labels = bright_primaries(90, seed=8)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = tmp_path / "data" / "test" / classes[label] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(image))
    result = CliRunner().invoke(main, ["calibrate", "--model", str(root),
                                       "--data", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    assert "ECE" in result.output and (root / "2" / calibration.CALIBRATION_FILE).is_file()
    # Too few images to set a threshold: one clear line, exit 2.
    result = CliRunner().invoke(main, ["calibrate", "--model", str(root / "1"), "--data",
                                       str(tmp_path / "data"), "--fit-fraction", "0.1"])
    assert result.exit_code == 2 and "too few" in result.output


def test_training_calibrates_on_its_held_out_images(tmp_path):
    from convnet.data import Split
    from convnet.train.publish import calibrate_staged

    version = write_version(tmp_path / "m", 1)
    images, labels = bright_primaries(300, seed=9)
    calibrate_staged(version, Split(images, labels, CIFAR10_LABELS), None)
    record = json.loads((version / calibration.CALIBRATION_FILE).read_text())
    assert record["fit_images"] + record["report_images"] == 300
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probabilities", "logits"]
    # Too few held-out images: a warning, and the version publishes uncalibrated.
    plain = write_version(tmp_path / "n", 1)
    calibrate_staged(plain, Split(images[:20], labels[:20], CIFAR10_LABELS), None)
    assert not (plain / calibration.CALIBRATION_FILE).exists()


def test_exporting_a_calibrated_version_keeps_its_temperature(tmp_path):
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    from convnet import export, modeldir

    keras.utils.set_random_seed(0)
    pixels = keras.Input((32, 32, 3), dtype="uint8", name="pixels")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(pixels))
    model = keras.Model(pixels, keras.layers.Dense(3, activation="softmax")(x))
    version = tmp_path / "shapes" / "1"
    version.mkdir(parents=True)
    model.save(version / modeldir.KERAS_FILE)
    modeldir.write_json_atomic(version / modeldir.LABELS_FILE, ["a", "b", "c"])
    modeldir.write_json_atomic(version / calibration.CALIBRATION_FILE, {"temperature": 0.5})
    exported = export.export_version(version, "onnx")
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()][1] == "logits"
    image = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    probs, logits = session.run(None, {"pixels": image})
    np.testing.assert_allclose(probs, calibration.softmax(logits, 0.5), atol=1e-5)
    np.testing.assert_allclose(calibration.softmax(logits), model.predict(image, verbose=0),
                               atol=1e-5)
