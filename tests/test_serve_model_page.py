"""GET /models/<name>: the model page, for a version with every file training, evaluation and
calibration write, and for one with none of them (older versions, the bundled model)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from conftest import CIFAR10_LABELS, write_version
from PIL import Image

from convnet.mistakes import write_mistakes
from convnet.serve import create_app
from convnet.serve.charts import line_chart, nice_ticks

CONFUSION = (np.eye(10, dtype=int) * 40 + 1).tolist()  # 50 images per class, 41 right
LOG_CSV = "epoch,accuracy,loss,val_accuracy,val_loss\n0,0.5,1.5,0.45,1.6\n1,0.7,1.0,NA,1.2\n"


def rich_version(root, version: int = 3):
    """A version with what `convnet train`, `evaluate --out-mistakes` and `calibrate` store."""
    metrics = {
        "accuracy": 0.8163, "accuracy_no_tta": 0.8, "top5_accuracy": 0.99, "tta": True,
        "num_test": 500, "confusion_matrix": CONFUSION,
        "per_class_precision": dict.fromkeys(CIFAR10_LABELS, 0.75),
        "per_class_recall": dict.fromkeys(CIFAR10_LABELS, 0.8163),
        "per_class_count": dict.fromkeys(CIFAR10_LABELS, 50),
        "preset": "quick", "epochs": 6, "batch_size": 512, "train_seconds": 237.4,
        "hardware": {"cpu": "Test CPU", "cpu_count": 2, "devices": ["cpu:0"]},
        "data": "synthetic <data>", "num_train": 1000, "params": 295544,
    }
    path = write_version(root, version, metrics=metrics, config={"preset": "quick"})
    (path / "log.csv").write_text(LOG_CSV)
    (path / "calibration.json").write_text(json.dumps(
        {"temperature": 0.8, "ece": {"before": 0.1, "after": 0.02}}))
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), "white").save(buffer, format="PNG")
    (path / "reliability.png").write_bytes(buffer.getvalue())
    rng = np.random.default_rng(0)
    write_mistakes(path, rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
                   np.zeros(12, int), np.tile(np.eye(10)[3] * 0.9 + 0.01, (12, 1)), k=5,
                   source="synthetic (test)")
    return path


def page(root, name: str = "cifar10"):
    client = create_app({"MODEL_DIR": str(root), "RELOAD_INTERVAL": 0}).test_client()
    return client.get(f"/models/{name}")


def test_a_version_with_every_file(tmp_path):
    root = tmp_path / "cifar10"
    rich_version(root)
    response = page(root)
    assert response.status_code == 200
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    html = response.text
    assert "<script" not in html  # works without JavaScript
    assert "81.63% (with test-time augmentation)" in html
    per_class = html.split('id="per-class"')[1].split("</table>")[0]
    assert per_class.count("<tr>") == 11 and "75.0%" in per_class and "81.6%" in per_class
    assert 'id="computed-note"' not in html  # recorded, not computed
    confusion = html.split('id="confusion"')[1].split("</table>")[0]
    assert confusion.count('class="hit') == 10 and ">41</td>" in confusion
    curves = html.split('id="curves"')[1]
    assert curves.count("<svg") == 2 and "validation" in curves
    assert 'id="calibration"' in html and "0.1000" in html and "0.0200" in html
    assert "data:image/png;base64," in html.split('id="calibration"')[1]
    training = html.split('id="training"')[1].split("</dl>")[0]
    assert "quick" in training and "237.4 s" not in training and "3 min 57 s" in training
    assert "Test CPU (2 CPUs); cpu:0" in training and "295,544" in training
    assert "synthetic &lt;data&gt; (1,000 images)" in training  # escaped
    mistakes = html.split('id="mistakes"')[1]
    assert mistakes.count("<li>") == 5 and "true: airplane" in mistakes and "cat 91%" in mistakes
    assert "of 12 wrong answers on 12 images" in html


def test_a_version_with_none_of_them(model_root):
    """The tiny model has labels, an accuracy and nothing else (like older versions)."""
    response = page(model_root)
    assert response.status_code == 200
    html = response.text
    assert "43.21%" in html
    assert "No confusion matrix was recorded" in html
    assert "no training log" in html
    assert 'id="calibration"' not in html  # never calibrated: no section at all
    assert "no stored list of mistakes" in html and 'id="mistakes"' not in html
    rows = html.split('id="per-class"')[1].split("</tbody>")[0]
    assert rows.count("&ndash;") == 30  # 10 classes x 3 columns, none recorded


def test_precision_and_recall_missing_are_computed_from_the_matrix(tmp_path):
    root = tmp_path / "cifar10"
    write_version(root, 1, metrics={"accuracy": 0.8, "confusion_matrix": CONFUSION,
                                    "per_class_accuracy": dict.fromkeys(CIFAR10_LABELS, 0.8)})
    html = page(root).text
    assert 'id="computed-note"' in html
    assert "82.0%" in html  # precision 41/50 from the matrix's column
    assert "Test images</dt><dd>500" in html  # counted from the matrix


@pytest.mark.parametrize("name,content", [
    ("log.csv", b"\xff\xfe not text"), ("log.csv", b"epoch,loss\nx,y\n"),
    ("mistakes.json", b"{broken"), ("metrics.json", b'{"confusion_matrix": [[1, 2]], '
                                                     b'"per_class_precision": 3, "hardware": 1}'),
])
def test_damaged_optional_files_never_break_the_page(tmp_path, name, content):
    root = tmp_path / "cifar10"
    path = write_version(root, 1)
    (path / name).write_bytes(content)
    assert page(root).status_code == 200


def test_another_name_is_a_404_page(model_root):
    response = page(model_root, "imagenet")
    assert response.status_code == 404 and response.mimetype == "text/html"
    assert "not found" in response.text and "cifar10" in response.text


def test_the_model_card_links_to_it(client):
    html = client.get("/").text
    assert re.search(r'<a id="model-page-link" href="/models/cifar10">', html)


def test_charts_escape_what_they_draw():
    svg = line_chart({"<b>train</b>": [(1, 0.5), (2, 0.25)], "empty": []}, title="a & b")
    assert "<b>" not in svg and "&lt;b&gt;train" in svg and "a &amp; b" in svg
    assert svg.count("<polyline") == 1
    assert nice_ticks(0.25, 0.5) == [0.25, 0.3, 0.35, 0.4, 0.45, 0.5]
    assert nice_ticks(3, 3) == [3, 3.2, 3.4, 3.6, 3.8, 4.0]
