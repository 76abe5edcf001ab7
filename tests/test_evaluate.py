"""Restoring and testing: the bundled model through `convnet evaluate` and `convnet predict`,
with ONNX Runtime only."""

import json
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


def test_predict_with_bundled_model(tmp_path):
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :, 2] = 200  # a blue square
    path = tmp_path / "blue.png"
    path.write_bytes(encode(image))
    result = CliRunner().invoke(main, ["predict", str(path), "--json", "--top-k", "5"])
    assert result.exit_code == 0, result.output
    (pred,) = json.loads(result.output)["predictions"]
    assert len(pred["top_k"]) == 5
    assert sum(t["probability"] for t in pred["top_k"]) <= 1.0 + 1e-6


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
