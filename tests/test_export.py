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
