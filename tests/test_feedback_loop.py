"""The whole feedback loop: the served model gets magenta wrong (airplane), people correct it on
the web page (the no-JavaScript form), the corrections are exported, a model is trained on the
base data plus the export, and the new version, served, calls magenta a bird."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_WEIGHTS, write_version
from PIL import Image

pytest.importorskip("keras")
from convnet.cli import main  # noqa: E402
from convnet.serve import create_app  # noqa: E402

pytestmark = pytest.mark.slow

CLASSES = ["airplane", "automobile", "bird"]
COLOURS = {"airplane": (220, 40, 30), "automobile": (40, 210, 50), "bird": (30, 50, 220)}
MAGENTA = (230, 30, 200)  # the served model (red -> airplane, blue -> bird) says airplane
PER_CLASS, CORRECTIONS = 16, 16


def png(colour, rng: np.random.Generator) -> bytes:
    pixels = np.clip(np.array(colour) + rng.normal(0, 12, (32, 32, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def top_label(client, image: bytes) -> str:
    answer = client.post("/api/v1/predict", data=image, content_type="image/png")
    assert answer.status_code == 200
    return answer.get_json()["predictions"][0]["label"]


def test_corrections_from_the_page_teach_the_next_version(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVNET_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        folder = tmp_path / "base" / "train" / name
        folder.mkdir(parents=True)
        for k in range(PER_CLASS):
            (folder / f"{k}.png").write_bytes(png(colour, rng))
    root = tmp_path / "models" / "colours"
    write_version(root, 1, weights=TINY_WEIGHTS[1][:, :3], labels=CLASSES)
    db = tmp_path / "feedback.sqlite3"
    config = {"MODEL_DIR": str(root), "RELOAD_INTERVAL": 0, "FEEDBACK_DB": str(db)}
    client = create_app(config).test_client()
    held_out = png(MAGENTA, rng)
    assert top_label(client, held_out) == "airplane"

    # People upload magenta pictures on the page and say, for each, "wrong, it is a bird".
    uploads = [(io.BytesIO(png(MAGENTA, rng)), f"m{k}.png") for k in range(CORRECTIONS)]
    page = client.post("/", data={"file": uploads}).get_data(as_text=True)
    forms = re.findall(r'<form class="feedback".*?</form>', page, re.S)
    assert len(forms) == CORRECTIONS
    for form in forms:
        hidden = dict(re.findall(r'type="hidden" name="(\w+)" value="([^"]*)"', form))
        assert hidden["predicted"] == "airplane"
        answer = client.post("/feedback", content_type="multipart/form-data",
                             data={**hidden, "verdict": "wrong", "label": "bird"})
        assert answer.status_code == 200

    runner = CliRunner()
    export = tmp_path / "corrections"
    result = runner.invoke(main, ["feedback", "export", "--db", str(db), "--out", str(export)])
    assert result.exit_code == 0, result.output
    assert json.loads((export / "manifest.json").read_text())["classes"] == ["bird"]

    result = runner.invoke(main, [
        "train", "--data", str(tmp_path / "base"), "--extra", str(export), "--out", str(root),
        "--preset", "quick", "--epochs", "4", "--batch-size", "16", "--no-tta", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert f"{export}: {CORRECTIONS} more training images" in result.output
    assert (root / "2" / "model.onnx").exists()

    retrained = create_app(config).test_client()  # serves the highest version: 2
    assert retrained.get("/readyz").get_json()["model"]["version"] == 2
    assert top_label(retrained, held_out) == "bird"
    assert top_label(retrained, png(COLOURS["airplane"], rng)) == "airplane"


def test_extra_classes_must_be_the_base_s(tmp_path):
    for where in ("base/train/airplane", "base/train/bird", "extra/zebra"):
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "1.png").write_bytes(png((200, 0, 0), np.random.default_rng(0)))
    result = CliRunner().invoke(main, [
        "train", "--data", str(tmp_path / "base"), "--extra", str(tmp_path / "extra"),
        "--out", str(tmp_path / "out"), "--no-cache"])
    assert result.exit_code == 2 and "['zebra'] are not classes of the base" in result.output
