"""End to end: train on a few hundred synthetic images, export, evaluate, predict, resume."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from synthetic import tar_folder, write_image_folder

keras = pytest.importorskip("keras")
from convnet import modeldir  # noqa: E402
from convnet import train as training  # noqa: E402
from convnet.cli import main  # noqa: E402
from convnet.data import load_dataset  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    write_image_folder(root / "src", per_class=60, num_classes=3, fmt="PNG")
    return tar_folder(root / "src", root / "shapes.tar.gz", "shapes")


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """One CLI training run shared by the tests below."""
    out = tmp_path_factory.mktemp("models") / "shapes"
    tb = out.parent / "tb"
    result = CliRunner().invoke(main, [
        "train", "--data", str(dataset), "--out", str(out), "--preset", "quick",
        "--epochs", "2", "--batch-size", "32", "--tensorboard", str(tb), "--no-cache",
    ])
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_a_complete_version(trained):
    vdir = trained / "1"
    for name in ("model.keras", "model.onnx", "labels.json", "metrics.json", "config.json",
                 "log.csv", "curves.png", "confusion.png"):
        assert (vdir / name).is_file(), name
    metrics = json.loads((vdir / "metrics.json").read_text())
    assert metrics["preset"] == "quick" and metrics["epochs"] == 2
    assert metrics["accuracy"] > 0.5  # three colour classes: chance is 1/3
    assert metrics["onnx_max_abs_diff"] <= 1e-4
    assert set(metrics["per_class_accuracy"]) == {"airplane", "automobile", "bird"}
    assert metrics["hardware"]["cpu_count"] >= 1 and metrics["backend"] == "tensorflow"
    assert list((trained.parent / "tb").rglob("events.out.tfevents.*"))


def test_evaluate_json_matches_metrics(trained, dataset, tmp_path):
    png = tmp_path / "cm.png"
    result = CliRunner().invoke(main, ["evaluate", "--model", str(trained), "--data",
                                       str(dataset), "--json", "--tta", "--confusion", str(png)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    saved = json.loads((trained / "1" / "metrics.json").read_text())
    assert report["accuracy"] == pytest.approx(saved["accuracy"], abs=1e-6)
    assert png.is_file()


def test_evaluate_keras_backend_agrees_with_onnx(trained, dataset, tmp_path):
    runs = [json.loads(CliRunner().invoke(main, [
        "evaluate", "--model", str(trained), "--data", str(dataset), "--json", "--backend", b,
        "--confusion", str(tmp_path / f"{b}.png")]).output) for b in ("onnx", "keras")]
    assert runs[0]["accuracy"] == pytest.approx(runs[1]["accuracy"], abs=0.01)


def test_predict_files(trained, tmp_path):
    from synthetic import encode, make_images

    images, _ = make_images(2, num_classes=3)
    files = []
    for i, img in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(encode(img))
    result = CliRunner().invoke(main, ["predict", "--model", str(trained), "--top-k", "2",
                                       "--json", *map(str, files)])
    assert result.exit_code == 0, result.output
    preds = json.loads(result.output)["predictions"]
    assert len(preds) == 2 and len(preds[0]["top_k"]) == 2
    assert preds[0]["top_k"][0]["probability"] >= preds[0]["top_k"][1]["probability"]


def test_predict_bad_file_is_a_clear_error(trained, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("hello")
    result = CliRunner().invoke(main, ["predict", "--model", str(trained), str(bad)])
    assert result.exit_code == 2
    assert "notes.jpg" in result.output and "not a supported image" in result.output


def test_export_onnx_and_saved_model(trained, tmp_path):
    tf = pytest.importorskip("tensorflow")
    out = tmp_path / "sm"
    result = CliRunner().invoke(main, ["export", "--model", str(trained), "--format",
                                       "saved_model", "--out", str(out)])
    assert result.exit_code == 0, result.output
    loaded = tf.saved_model.load(str(out))
    sig = loaded.signatures["serving_default"]
    x = np.zeros((2, 32, 32, 3), np.uint8)
    probs = sig(pixels=tf.constant(x))["probabilities"].numpy()
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    result = CliRunner().invoke(main, ["export", "--model", str(trained / "1"),
                                       "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0 and (tmp_path / "m.onnx").is_file()


def test_interrupt_then_resume(dataset, tmp_path):
    splits = load_dataset(dataset, cache=False)
    cfg = training.TrainConfig(preset="quick", epochs=2, batch_size=32, tta=False)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, splits["train"], out, callbacks=(Interrupt(),), verbose=0)
    state = json.loads((out / ".checkpoint" / "state.json").read_text())
    assert state["epochs_done"] == 1 and not modeldir.list_versions(out)
    version = training.train(cfg, splits["train"], out, test_split=splits["test"],
                             resume=True, verbose=0)
    assert version.name == "1"
    log_rows = (version / "log.csv").read_text().strip().splitlines()
    assert len(log_rows) == 3  # header + epoch 1 (first run) + epoch 2 (resumed)


def test_second_run_writes_next_version(trained, dataset):
    before = (trained / "1" / "model.onnx").read_bytes()
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(trained),
                                       "--preset", "tutorial", "--epochs", "1",
                                       "--batch-size", "32", "--no-tta"])
    assert result.exit_code == 0, result.output
    assert modeldir.list_versions(trained) == [1, 2]
    assert (trained / "1" / "model.onnx").read_bytes() == before


def test_dry_run_prints_params_and_flops():
    result = CliRunner().invoke(main, ["train", "--data", ".", "--dry-run"])
    assert result.exit_code == 0
    assert "parameters:" in result.output and "forward FLOPs per image:" in result.output


def test_too_small_for_a_batch_is_a_clear_error(dataset, tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out",
                                       str(tmp_path / "m"), "--batch-size", "4096"])
    assert result.exit_code == 2 and "fewer than one batch" in result.output


@pytest.mark.parametrize(("preset", "batch"), [("quick", 512), ("fast", 1024)])
def test_the_default_batch_size_is_the_presets(dataset, tmp_path, preset, batch):
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out",
                                       str(tmp_path / "m"), "--preset", preset])
    assert result.exit_code == 2, result.output
    assert f"fewer than one batch of {batch}" in result.output


def test_batches_run_on_across_epochs_and_resume_where_they_stopped():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    split = training.Split(images, rng.integers(0, 3, 100), ["a", "b", "c"])
    cfg = training.TrainConfig(batch_size=32, seed=5)
    batches = training.Batches(split, cfg, 3)
    assert batches.steps_per_epoch == 3 and batches.num_batches is None  # endless
    run = [batches[i] for i in range(9)]  # three epochs in one sequence
    resumed = training.Batches(split, cfg, 3, epoch=2)
    for i in range(3):
        np.testing.assert_array_equal(resumed[i][0], run[6 + i][0])
        np.testing.assert_array_equal(resumed[i][1], run[6 + i][1])
    # every epoch draws a new order and new shifts; labels stay one-hot rows of the images' own
    assert not np.array_equal(run[0][0], run[3][0])
    assert run[0][1].shape == (32, 3) and (run[0][1].sum(axis=1) == 1).all()


def test_the_tensorflow_pipeline_serves_the_same_batches_without_autotuning():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    split = training.Split(images, rng.integers(0, 3, 100), ["a", "b", "c"])
    cfg = training.TrainConfig(batch_size=32, seed=7)
    dataset = training.Batches(split, cfg, 3).tf_dataset()
    # the autotuner's thread is what stalled the end of fit: it must not run
    assert dataset.options().autotune.enabled is False
    expected = training.Batches(split, cfg, 3)
    for i, (x, y) in enumerate(dataset.take(7)):  # across two epoch boundaries
        np.testing.assert_array_equal(x.numpy(), expected[i][0])
        np.testing.assert_array_equal(y.numpy(), expected[i][1])
