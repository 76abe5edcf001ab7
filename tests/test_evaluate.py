"""Restoring and testing: the bundled model through `convnet evaluate` and `convnet predict`,
with ONNX Runtime only."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from synthetic import encode

from convnet import evaluate
from convnet.cli import main

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg"


def test_accuracy_report_counts():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    report = evaluate.accuracy_report(probs, np.array([0, 1, 1]), ["a", "b"])
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["per_class_accuracy"] == {"a": 1.0, "b": 0.5}
    assert report["confusion_matrix"] == [[1, 0], [1, 1]]
    assert report["top5_accuracy"] == 1.0


def test_top_k_orders_by_probability():
    ranked = evaluate.top_k(np.array([[0.1, 0.7, 0.2]]), ["a", "b", "c"], 2)[0]
    assert [r["label"] for r in ranked] == ["b", "c"] and ranked[0]["index"] == 1


def test_predict_reports_what_the_model_computes(tmp_path):
    """`convnet predict` on three images: the ranking, labels and probabilities are the bundled
    ONNX model's own output for those pixels, in the order the files were given."""
    import onnxruntime as ort

    from convnet import modeldir

    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"image{i}.png")
        paths[-1].write_bytes(encode(image))
    result = CliRunner().invoke(main, ["predict", *map(str, paths), "--json", "--top-k", "3"])
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.output)["predictions"]

    version = modeldir.resolve_version(None)
    labels = json.loads((version / "labels.json").read_text())
    session = ort.InferenceSession(str(version / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: images})[0]
    assert len(predictions) == 3
    for pred, probs in zip(predictions, expected, strict=True):
        order = np.argsort(-probs)[:3]
        assert [t["label"] for t in pred["top_k"]] == [labels[i] for i in order]
        assert [t["probability"] for t in pred["top_k"]] == pytest.approx(probs[order], abs=1e-5)
        assert pred["label"] == labels[order[0]]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/cifar10-jpeg is absent")
def test_predict_names_confident_images_correctly(tmp_path):
    """Real CIFAR-10 test photos: every one the bundled (calibrated) model gives at least 0.99
    gets its true class, and there are plenty of them (19 of these 50)."""
    truth = {}
    with tarfile.open(SHARED / "test.tar.gz") as archive:
        members = [m for m in archive if m.isfile() and m.name.endswith(".jpg")]
        for member in members[::100]:  # 50 images, 5 per class
            path = tmp_path / member.name.replace("/", "_")
            path.write_bytes(archive.extractfile(member).read())
            truth[path.name] = member.name.split("/")[-2]
    files = sorted(truth)
    result = CliRunner().invoke(main, ["predict", "--json",
                                       *(str(tmp_path / f) for f in files)])
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.output)["predictions"]
    confident = [(f, p["label"]) for f, p in zip(files, predictions, strict=True)
                 if p["probability"] >= 0.99]
    assert len(confident) >= 15
    assert [label for _, label in confident] == [truth[f] for f, _ in confident]


def test_missing_model_dir_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["predict", "--model", str(tmp_path), __file__])
    assert result.exit_code == 2 and "holds no model" in result.output


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/cifar10-jpeg is absent")
def test_bundled_model_on_shared_test_set(tmp_path):
    png = tmp_path / "cm.png"
    result = CliRunner().invoke(main, ["evaluate", "--data", str(SHARED / "test.tar.gz"),
                                       "--json", "--confusion", str(png)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    bundled = json.loads((Path(report["model"]) / "metrics.json").read_text())
    assert report["num_images"] == 5000
    # The bundled model's own recorded figure, reproduced from the shipped ONNX file.
    assert report["accuracy"] == pytest.approx(bundled["accuracy_no_tta"], abs=0.002)
    assert report["accuracy"] >= 0.85
    assert png.stat().st_size > 0


THREE = ["airplane", "automobile", "bird"]  # the tiny model: red, green, blue


@pytest.fixture
def model_64(tmp_path) -> Path:
    """A 64 px model root whose three classes are the dominant colour channel."""
    from conftest import TINY_WEIGHTS, write_version

    write_version(tmp_path / "m64", 1, weights=TINY_WEIGHTS[1][:, :3], labels=THREE, size=64)
    return tmp_path / "m64"


def test_predict_decodes_at_the_models_size(tmp_path, model_64):
    """A 64 px model: each file is decoded to 64x64 (a 32x32 decode would not fit the graph)
    and the answer is the model's own output for those pixels."""
    import onnxruntime as ort

    from convnet.imaging import decode_image

    rng = np.random.default_rng(3)
    paths = []
    for i, shape in enumerate([(150, 90, 3), (64, 64, 3), (20, 30, 3)]):
        paths.append(tmp_path / f"image{i}.png")
        paths[-1].write_bytes(encode(rng.integers(0, 256, shape, dtype=np.uint8)))
    result = CliRunner().invoke(main, ["predict", "--model", str(model_64), "--json",
                                       *map(str, paths)])
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.output)["predictions"]
    pixels = np.stack([decode_image(p.read_bytes(), size=64) for p in paths])
    session = ort.InferenceSession(str(model_64 / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, {"pixels": pixels})[0]
    for prediction, probs in zip(predictions, expected, strict=True):
        assert prediction["label"] == THREE[probs.argmax()]
        assert prediction["probability"] == pytest.approx(probs.max(), abs=1e-6)


def test_evaluate_loads_the_data_at_the_models_size(tmp_path, model_64, monkeypatch):
    """An image folder of red, green and blue photos of assorted sizes, decoded at 64 for the
    64 px model (at 32 the graph would refuse them), all classified right."""
    monkeypatch.setenv("CONVNET_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(5)
    for label, channel in enumerate(THREE):
        for k, shape in enumerate([(64, 64), (120, 80), (40, 70)]):
            image = rng.integers(0, 60, (*shape, 3), dtype=np.uint8)
            image[..., label] += 180
            path = tmp_path / "data" / "test" / channel / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(image))
    result = CliRunner().invoke(main, [
        "evaluate", "--model", str(model_64), "--data", str(tmp_path / "data"), "--json",
        "--confusion", str(tmp_path / "cm.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["num_images"] == 9 and report["accuracy"] == 1.0


def test_images_of_another_size_are_refused_clearly(model_64):
    predictor = evaluate.load_predictor(model_64)
    assert predictor.input_size == 64
    with pytest.raises(ValueError, match=r"takes \[N, 64, 64, 3\] \(load the data with size=64"):
        evaluate.evaluate(predictor, np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, int))


def test_a_model_whose_config_contradicts_its_graph_is_refused(tmp_path):
    from conftest import write_version

    write_version(tmp_path / "m", 1, size=64, config={"image_size": 32})
    result = CliRunner().invoke(main, ["predict", "--model", str(tmp_path / "m"), __file__])
    assert result.exit_code == 2
    assert "config.json says image_size 32, but model.onnx takes 64x64 images" in result.output
