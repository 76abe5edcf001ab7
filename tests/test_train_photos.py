"""Training on photos end to end at 64 px: the plain command on a synthetic photo folder chooses
the input size and the photo augmentation, weights its imbalanced classes, and publishes a model
whose ONNX and Keras forms take [N, 64, 64, 3], agree, and say 64 in config.json and
metrics.json."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from synthetic import CLASSES, encode, make_photo

pytest.importorskip("keras")
from convnet.cli import main  # noqa: E402

TRAIN_COUNTS = (24, 24, 10)  # the third class has under half the others': weighted
SIZES = ((96, 64), (64, 80), (112, 72))  # median shorter side 64 px, under PHOTO_SIZE: kept


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, counts in (("train", TRAIN_COUNTS), ("test", (6, 6, 6))):
        for c, count in enumerate(counts):
            folder = root / "data" / split / CLASSES[c]
            folder.mkdir(parents=True)
            for k in range(count):
                width, height = SIZES[k % len(SIZES)]
                (folder / f"{k}.jpg").write_bytes(encode(make_photo(c, width, height, rng),
                                                         "JPEG"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVNET_CACHE_DIR", str(root / "cache"))
        result = CliRunner().invoke(main, [
            "train", "--data", str(root / "data"), "--out", str(root / "models"),
            "--preset", "quick", "--epochs", "2", "--batch-size", "16"])
        assert result.exit_code == 0, result.output
        yield root, root / "models" / "1", result.output


def test_the_plain_command_chooses_64_px_and_photo_augmentation(photo_run):
    _, version, output = photo_run
    assert "median shorter side 64 px -> 64x64 input, photo augmentation" in output
    config = json.loads((version / "config.json").read_text())
    metrics = json.loads((version / "metrics.json").read_text())
    assert config["image_size"] == metrics["image_size"] == 64
    assert config["augment"] == metrics["augment"] == "photo"


def test_class_counts_weights_and_per_class_figures_are_recorded(photo_run):
    _, version, output = photo_run
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["class_counts"] == dict(zip(CLASSES, TRAIN_COUNTS, strict=False))
    assert "airplane 24, automobile 24, bird 10" in output
    weights = metrics["class_weights"]
    assert weights["bird"] > 1 > weights["airplane"] == weights["automobile"]
    for key in ("per_class_precision", "per_class_recall"):
        assert set(metrics[key]) == set(CLASSES[:3])
    assert 0 <= metrics["balanced_accuracy"] <= 1
    mean, std = metrics["normalisation"]["mean"], metrics["normalisation"]["std"]
    assert len(mean) == len(std) == 3 and all(s > 0 for s in std)


def test_onnx_and_keras_take_64_px_and_agree(photo_run):
    import keras
    import onnx

    from convnet import data
    from convnet.evaluate import onnx_session

    root, version, _ = photo_run
    graph = onnx.load(str(version / "model.onnx")).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert graph.input[0].name == "pixels"
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 64, 64, 3]
    model = keras.models.load_model(version / "model.keras", compile=False)
    assert tuple(model.input.shape) == (None, 64, 64, 3)
    images = data.load_dataset(root / "data", size=64, cache=False)["test"].images
    ours = onnx_session(version / "model.onnx").run(None, {"pixels": images})[0]
    np.testing.assert_allclose(ours, np.asarray(model(images, training=False)), atol=1e-4)
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["onnx_max_abs_diff"] <= 1e-4 and metrics["num_test"] == 18


def test_evaluate_reads_the_data_at_the_model_s_size(photo_run, tmp_path, monkeypatch):
    root, version, _ = photo_run
    monkeypatch.setenv("CONVNET_CACHE_DIR", str(root / "cache"))
    result = CliRunner().invoke(main, ["evaluate", "--model", str(root / "models"), "--data",
                                       str(root / "data"), "--json", "--confusion",
                                       str(tmp_path / "cm.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    metrics = json.loads((version / "metrics.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["accuracy_no_tta"], abs=1e-6)
    for key in ("per_class_precision", "per_class_recall"):
        assert set(report[key]) == set(CLASSES[:3])
