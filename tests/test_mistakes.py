"""The most confidently wrong test images (convnet.mistakes), and `convnet evaluate
--out-mistakes` writing them."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from synthetic import encode

from convnet.cli import main
from convnet.mistakes import (
    MISTAKES_FILE,
    THUMBNAIL_MAX,
    most_confident_mistakes,
    read_mistakes,
    write_mistakes,
)

CLASSES = ["airplane", "automobile", "bird"]


def test_the_most_confident_wrong_answers_come_first():
    labels = np.array([0, 1, 2, 0, 1])
    probs = np.array([[0.9, 0.05, 0.05],   # right
                      [0.7, 0.2, 0.1],     # wrong, 0.7
                      [0.1, 0.85, 0.05],   # wrong, 0.85
                      [0.4, 0.6, 0.0],     # wrong, 0.6
                      [0.1, 0.8, 0.1]])    # right
    assert most_confident_mistakes(labels, probs, 2).tolist() == [2, 1]
    assert most_confident_mistakes(labels, probs, 10).tolist() == [2, 1, 3]
    assert most_confident_mistakes(labels[:1], probs[:1], 5).tolist() == []


@pytest.mark.parametrize("size", [32, 160])
def test_written_and_read_back(tmp_path, size):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), [1, 1, 0, 2, 1, 2]] = 0.8  # images 0, 2, 3 are wrong
    path = write_mistakes(tmp_path, images, labels, probs, k=2, classes=CLASSES,
                          source="synthetic (test)", tta=False)
    assert path == tmp_path / MISTAKES_FILE
    record = read_mistakes(tmp_path)
    assert record["num_wrong"] == 3 and record["num_images"] == 6 and record["k"] == 2
    first = record["mistakes"][0]
    assert (first["index"], first["true"], first["predicted"]) == (0, "airplane", "automobile")
    assert first["probability"] == pytest.approx(0.8 / 1.0)
    thumbnail = Image.open(io.BytesIO(base64.b64decode(first["thumbnail"])))
    assert thumbnail.size == (min(size, THUMBNAIL_MAX),) * 2
    if size <= THUMBNAIL_MAX:  # a small input is stored exactly as the model saw it
        np.testing.assert_array_equal(np.asarray(thumbnail), images[0])


def test_labels_come_from_the_version_folder(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps(CLASSES))
    write_mistakes(tmp_path, np.zeros((1, 32, 32, 3), np.uint8), np.array([2]),
                   np.array([[0.5, 0.3, 0.2]]))
    assert read_mistakes(tmp_path)["mistakes"][0]["true"] == "bird"
    with pytest.raises(ValueError, match="do not match"):
        write_mistakes(tmp_path, np.zeros((1, 32, 32, 3), np.uint8), np.array([0]),
                       np.array([[0.5, 0.5]]))


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"mistakes": 3}', b"\xff\xfe"])
def test_a_damaged_file_reads_as_none(tmp_path, content):
    (tmp_path / MISTAKES_FILE).write_bytes(content)
    assert read_mistakes(tmp_path) is None
    assert read_mistakes(tmp_path / "elsewhere") is None


def test_entries_the_page_cannot_show_are_dropped(tmp_path):
    good = {"true": "cat", "predicted": "dog", "probability": 0.9, "thumbnail": ""}
    (tmp_path / MISTAKES_FILE).write_text(json.dumps({"mistakes": [
        good, {**good, "probability": "high"}, "text", {"true": "cat"}]}))
    assert read_mistakes(tmp_path)["mistakes"] == [good]


def test_evaluate_writes_them(tmp_path, monkeypatch):
    """The tiny three-colour model on a folder where one green image is filed under bird."""
    from conftest import TINY_WEIGHTS, write_version

    monkeypatch.setenv("CONVNET_CACHE_DIR", str(tmp_path / "cache"))
    model = write_version(tmp_path / "m", 1, weights=TINY_WEIGHTS[1][:, :3], labels=CLASSES)
    for label, folder in enumerate(CLASSES):
        for k in range(2):
            image = np.full((32, 32, 3), 40, np.uint8)
            image[..., label] = 230
            path = tmp_path / "data" / "test" / folder / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(image))
    wrong = np.full((32, 32, 3), 40, np.uint8)
    wrong[..., 1] = 230
    (tmp_path / "data" / "test" / "bird" / "2.png").write_bytes(encode(wrong))
    result = CliRunner().invoke(main, [
        "evaluate", "--model", str(model), "--data", str(tmp_path / "data"), "--json",
        "--confusion", str(tmp_path / "cm.png"), "--out-mistakes", str(model)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["mistakes_json"] == str(model / MISTAKES_FILE)
    record = read_mistakes(model)
    assert record["num_wrong"] == 1 and record["tta"] is False
    assert [(m["true"], m["predicted"]) for m in record["mistakes"]] == [("bird", "automobile")]
