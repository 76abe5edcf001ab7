"""End to end: train on a few hundred synthetic images, export, evaluate, predict, resume; and the
training options' promises (time limit, validation split, test file, precision, seeds)."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from synthetic import tar_folder, write_image_folder

keras = pytest.importorskip("keras")
from convnet import modeldir  # noqa: E402
from convnet import train as training  # noqa: E402
from convnet.cli import main  # noqa: E402
from convnet.train import config  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    write_image_folder(root / "src", per_class=60, num_classes=3, fmt="PNG")
    return tar_folder(root / "src", root / "shapes.tar.gz", "shapes")


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory):
    """One CLI training run shared by the tests below: (model root, what it printed)."""
    out = tmp_path_factory.mktemp("models") / "shapes"
    tb = out.parent / "tb"
    result = CliRunner().invoke(main, [
        "train", "--data", str(dataset), "--out", str(out), "--preset", "quick",
        "--epochs", "2", "--batch-size", "32", "--tensorboard", str(tb), "--no-cache",
    ])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run[0]


def test_train_writes_a_complete_version(trained):
    vdir = trained / "1"
    for name in ("model.keras", "model.onnx", "labels.json", "metrics.json", "config.json",
                 "log.csv", "curves.png", "confusion.png", "mistakes.json", "calibration.json",
                 "reliability.png"):
        assert (vdir / name).is_file(), name
    metrics = json.loads((vdir / "metrics.json").read_text())
    # no --val-split: half the test split fits the temperature, the other half measures it
    calibrated = json.loads((vdir / "calibration.json").read_text())
    assert calibrated["data"].startswith("half of the held-out split")
    assert metrics["temperature"] == calibrated["temperature"] and metrics["ece"]["after"] >= 0
    wrong = json.loads((vdir / "mistakes.json").read_text())
    assert wrong["num_images"] == metrics["num_test"]
    assert wrong["num_wrong"] == round(metrics["num_test"] * (1 - metrics["accuracy"]))
    assert metrics["preset"] == "quick" and metrics["epochs"] == 2
    assert metrics["accuracy"] > 0.5  # three colour classes: chance is 1/3
    assert metrics["onnx_max_abs_diff"] <= 1e-4
    assert set(metrics["per_class_accuracy"]) == {"airplane", "automobile", "bird"}
    assert metrics["hardware"]["cpu_count"] >= 1 and metrics["backend"] == "tensorflow"
    assert list((trained.parent / "tb").rglob("events.out.tfevents.*"))


def test_output_not_on_a_terminal_is_one_line_per_epoch(trained_run):
    _, output = trained_run
    assert "\x1b" not in output and "\r" not in output  # no colours, no redrawn bar
    epochs = [line for line in output.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"]
    assert all("loss" in line and "accuracy" in line for line in epochs)


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


def test_second_run_writes_next_version(trained, dataset):
    before = (trained / "1" / "model.onnx").read_bytes()
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(trained),
                                       "--preset", "tutorial", "--epochs", "1",
                                       "--batch-size", "32", "--no-tta"])
    assert result.exit_code == 0, result.output
    assert modeldir.list_versions(trained) == [1, 2]
    assert (trained / "1" / "model.onnx").read_bytes() == before


def test_dry_run_prints_params_and_flops_for_the_data_and_size(dataset):
    def dry(*extra):
        result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--dry-run", *extra])
        assert result.exit_code == 0, result.output
        assert "parameters:" in result.output and "forward FLOPs per image:" in result.output
        return result.output

    plain = dry()
    assert "3 classes" in plain and "input: 32x32 px" in plain  # 32x32 images: CIFAR-style
    large = dry("--image-size", "96")
    assert "input: 96x96 px" in large

    def flops(output):
        return int(output.split("forward FLOPs per image:")[1].split()[0].replace(",", ""))

    assert flops(large) > flops(plain)


def test_too_small_for_a_batch_is_a_clear_error(dataset, tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out",
                                       str(tmp_path / "m"), "--batch-size", "4096"])
    assert result.exit_code == 2 and "fewer than one batch" in result.output


@pytest.mark.parametrize(("preset", "loop", "batch", "epochs"), [
    ("fast", "fit", 1024, 8), ("quick", "fit", 512, 6), ("fast", "device", 1024, 12),
    ("quick", "device", 1024, 12)])
def test_cifar_sized_data_keeps_the_presets_defaults(preset, loop, batch, epochs):
    from convnet.train.config import default_batch_size, default_epochs

    for num_train in (50_000, 45_000):  # CIFAR-10's train set, less a 10% validation split
        assert default_batch_size(preset, loop, num_train) == batch
        assert default_epochs(preset, loop, num_train) == epochs


def test_muon_is_the_default_only_where_it_was_measured():
    from convnet.train.config import (
        MUON_BATCH,
        MUON_EPOCHS,
        default_batch_size,
        default_epochs,
        default_optimizer,
    )

    for preset in ("fast", "quick"):
        for num_train in (50_000, 45_000):
            assert default_optimizer(preset, "fit", "airbench", num_train) == "muon"
            assert default_batch_size(preset, "fit", num_train, "muon") == MUON_BATCH[preset]
            assert default_epochs(preset, "fit", num_train, "muon") == MUON_EPOCHS[preset]
    assert default_batch_size("fast", "fit", 30_000, "muon") == MUON_BATCH["fast"] // 2
    assert default_optimizer("fast", "device", "airbench", 50_000) == "sgd"  # the JAX loop
    assert default_optimizer("fast", "fit", "photo", 50_000) == "sgd"  # photos: tuned on SGD
    assert default_optimizer("fast", "fit", "airbench", 2_349) == "sgd"  # too few for its batch
    assert default_optimizer("tutorial", "fit", "airbench", 50_000) == "adam"


def test_auto_precision_on_model_fit_is_bfloat16_where_the_cpu_computes_in_it(monkeypatch):
    monkeypatch.setattr(training, "training_on_cpu", lambda: True)
    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert training.fit_precision() == "bfloat16"
    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert training.fit_precision() == "float32"
    monkeypatch.setattr(training, "cpu_flags", lambda: None)  # unknown: the safe one
    assert training.fit_precision() == "float32"
    monkeypatch.setattr(training, "training_on_cpu", lambda: False)
    assert training.fit_precision() == "float32"


def test_the_optimizer_is_recorded_and_refused_where_it_cannot_run(trained, resume_split,
                                                                   tmp_path):
    config = json.loads((trained / "1" / "config.json").read_text())
    assert config["optimizer"] == "sgd"  # 180 images: too few for Muon's batches
    assert config["precision"] in ("float32", "bfloat16")  # resolved, not "auto"
    with pytest.raises(training.TrainError, match="--optimizer muon"):
        training.choose_loop(training.TrainConfig(loop="device", optimizer="muon"))
    for cfg, message in ((training.TrainConfig(optimizer="adamw"), "unknown optimizer"),
                         (training.TrainConfig(preset="tutorial", optimizer="muon"), "Adam"),
                         (training.TrainConfig(optimizer="muon", lr=5.0),
                          "lr: SGD's settings.*--optimizer sgd")):
        with pytest.raises(training.TrainError, match=message):
            training.train(cfg, resume_split, tmp_path, verbose=0)
    result = CliRunner().invoke(main, ["train", "--data", ".", "--optimizer", "adamw"])
    assert result.exit_code == 2 and "--optimizer" in result.output


def test_a_small_data_set_gets_smaller_batches_and_more_epochs():
    from convnet.train.config import default_batch_size, default_epochs

    assert default_batch_size("fast", "fit", 2_349) == 64
    assert default_epochs("fast", "fit", 2_349) > 8


def test_stratified_validation_split_holds_out_each_class_s_share():
    labels = np.repeat([0, 1, 2], [100, 20, 1])
    split = training.Split(np.zeros((121, 32, 32, 3), np.uint8), labels, ["a", "b", "c"])
    fit, val = training.split_validation(split, 0.2, seed=0)
    assert np.bincount(val.labels, minlength=3).tolist() == [20, 4, 0]  # "c" stays to train
    assert np.bincount(fit.labels, minlength=3).tolist() == [80, 16, 1]


def test_class_weights_only_when_imbalanced():
    def split(counts):
        labels = np.repeat(np.arange(len(counts)), counts)
        return training.Split(np.zeros((len(labels), 32, 32, 3), np.uint8), labels,
                              [str(i) for i in range(len(counts))])

    assert training.class_weights("auto", split([50, 40, 30])) is None  # within 2x
    assert training.class_weights("none", split([100, 10])) is None
    weights = training.class_weights("auto", split([100, 25, 0]))
    np.testing.assert_allclose(weights, [125 / 200, 125 / 50, 0])  # N / (C * n_c), C present
    with pytest.raises(training.TrainError, match="unknown class weighting"):
        training.class_weights("balanced", split([1, 1]))


def test_the_device_loop_refuses_other_sizes_by_name():
    cfg = training.TrainConfig(loop="device", image_size=64, augment="photo")
    with pytest.raises(training.TrainError, match="--image-size 64.*--augment photo"):
        training.choose_loop(cfg)


def log_rows(version) -> list[dict]:
    with open(version / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def short_run(dataset, tmp_path_factory):
    """One CLI run with a time limit too short for a second epoch, a validation split, a
    separate test file of 15 images (the dataset's own test split has 180) and outlier
    exposure."""
    root = tmp_path_factory.mktemp("short")
    write_image_folder(root / "test-src", splits=("test",), per_class=5, num_classes=3, seed=7)
    test_file = tar_folder(root / "test-src", root / "test.tar.gz", "t")
    out = root / "out"
    result = CliRunner().invoke(main, [
        "train", "--data", str(dataset), "--test-data", str(test_file), "--out", str(out),
        "--preset", "quick", "--epochs", "3", "--batch-size", "32", "--no-tta",
        "--time-limit", "0.001", "--val-split", "0.25", "--no-cache", "--outliers", "0.25"])
    assert result.exit_code == 0, result.output
    return out / "1", result.output


def test_time_limit_stops_early_and_still_publishes(short_run):
    version, _ = short_run
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["epochs"] == 1  # of 3 asked for
    assert len(log_rows(version)) == 1
    assert (version / "model.onnx").is_file() and "accuracy" in metrics


def test_val_split_holds_images_out_and_reports_them_every_epoch(short_run):
    version, output = short_run
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["num_train"] == 180 - 45  # a quarter of 180 held out
    row = log_rows(version)[0]
    assert 0 <= float(row["val_accuracy"]) <= 1 and float(row["val_loss"]) > 0
    assert "val_accuracy" in output


def test_outlier_exposure_is_recorded_and_refused_where_it_cannot_run(short_run):
    version, _ = short_run
    assert json.loads((version / "config.json").read_text())["outliers"] == 0.25
    with pytest.raises(training.TrainError, match="--outliers"):
        training.choose_loop(training.TrainConfig(loop="device", outliers=0.1))
    result = CliRunner().invoke(main, ["train", "--data", ".", "--outliers", "1.5"])
    assert result.exit_code == 2 and "--outliers" in result.output


def test_test_data_scores_on_that_file(short_run):
    version, _ = short_run
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["num_test"] == 15  # not the dataset's test split, not the validation images


class TimeLimitClock:
    """A clock the test moves by hand, for TimeLimit."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def epochs_within(seconds: float, epoch_seconds, cost=None) -> int:
    """How many epochs TimeLimit(seconds) lets run when epoch e takes epoch_seconds(e)."""
    from convnet.train.fit_loop import TimeLimit

    clock = TimeLimitClock()
    limit = TimeLimit(seconds, clock=clock, cost=cost)
    limit.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    limit.model.stop_training = False
    limit.on_train_begin()
    ran = 0
    for epoch in range(10):
        limit.on_epoch_begin(epoch)
        clock.now += epoch_seconds(epoch)
        limit.on_epoch_end(epoch)
        ran += 1
        if limit.model.stop_training:
            break
    return ran


def test_time_limit_stops_at_the_last_epoch_that_fits():
    assert epochs_within(25, lambda epoch: 10) == 2  # a third would end at 30 s, past 25


def test_the_time_limit_expects_a_full_size_epoch_to_cost_more_than_a_low_resolution_one():
    def side(epoch):
        return 24 if epoch < 2 else 32

    ran = epochs_within(35, lambda epoch: 10 * side(epoch) ** 2 / 24**2,
                        cost=lambda epoch: side(epoch) ** 2)
    assert ran == 2  # the third, at 32 px, would take 17.8 s and end past 35 (not 30: inside)


def test_a_fractional_epoch_count_ends_part_way_through_the_last_epoch(resume_split, tmp_path):
    steps = []

    class Count(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            steps.append(int(self.model.optimizer.iterations.numpy()))

    cfg = training.TrainConfig(preset="quick", epochs=1.5, batch_size=32, tta=False)
    version = training.train(cfg, resume_split, tmp_path, callbacks=(Count(),), verbose=0)
    assert steps == [6]  # 128 images in batches of 32: 4 steps, then 2 of the second epoch
    assert json.loads((version / "metrics.json").read_text())["epochs"] == 1.5
    assert len(log_rows(version)) == 2


def test_bfloat16_on_a_cpu_without_bfloat16_instructions_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(training, "training_on_cpu", lambda: True)
    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx2", "avx512f", "fma"})
    with pytest.raises(training.TrainError, match="no bfloat16 instructions.*float32"):
        training.check_precision("bfloat16")
    training.check_precision("float32")  # float32 is always fine
    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    training.check_precision("bfloat16")
    monkeypatch.setattr(training, "cpu_flags", lambda: None)  # unknown: not refused
    training.check_precision("bfloat16")


def test_bfloat16_precision_computes_in_bfloat16_on_fit_and_publishes_float32(tmp_path,
                                                                              monkeypatch):
    from synthetic import make_images

    # the CI machine's CPU may lack bfloat16 instructions; this test is about the policy
    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx512_bf16"})

    images, labels = make_images(64, 3)
    split = training.Split(images, labels, ["a", "b", "c"])
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if not seen:
                conv = next(la for la in self.model.layers
                            if isinstance(la, keras.layers.Conv2D) and la.name != "whiten")
                inside = keras.Model(self.model.inputs[0], conv.output)
                seen["policy"] = self.model.dtype_policy.name
                seen["output"] = str(inside(images[:2]).dtype)
                seen["kernel"] = str(conv.kernel.dtype)

    cfg = training.TrainConfig(preset="quick", epochs=1, batch_size=32, tta=False,
                               precision="bfloat16")
    version = training.train(cfg, split, tmp_path / "m", callbacks=(Probe(),), verbose=0)
    assert seen["policy"] == "mixed_bfloat16"
    assert "bfloat16" in seen["output"] and "float32" in seen["kernel"]
    published = keras.models.load_model(version / "model.keras", compile=False)
    assert published.dtype_policy.name == "float32"
    assert json.loads((version / "metrics.json").read_text())["onnx_max_abs_diff"] <= 1e-4


# --- seeds and --resume -----------------------------------------------------------------------

RESUME_CFGS = {name: training.TrainConfig(preset="quick", epochs=5, batch_size=32, tta=False,
                                          optimizer=name) for name in ("sgd", "muon")}
INTERRUPT_AFTER = 4  # epochs; the stem froze at the start of the 4th (optim.WHITEN_BIAS_EPOCHS)
# Resuming restores weights, optimizer, lookahead average and data order, and TensorFlow's CPU
# kernels are deterministic for a fixed input, so the runs agree to the bit; the tolerance only
# leaves room for a platform whose kernels are not.
RESUME_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def resume_split():
    from synthetic import make_images

    images, labels = make_images(128, 3)
    return training.Split(images, labels, ["a", "b", "c"])


def final_weights(version) -> list[np.ndarray]:
    return keras.models.load_model(version / "model.keras", compile=False).get_weights()


@pytest.fixture(scope="module", params=sorted(RESUME_CFGS))
def uninterrupted(request, resume_split, tmp_path_factory):
    """(config, final weights) of an uninterrupted run, for each optimizer."""
    cfg = RESUME_CFGS[request.param]
    out = tmp_path_factory.mktemp("uninterrupted")
    return cfg, final_weights(training.train(cfg, resume_split, out, verbose=0))


def test_a_seed_repeats_a_run_exactly(uninterrupted, resume_split, tmp_path):
    cfg, weights = uninterrupted
    again = final_weights(training.train(cfg, resume_split, tmp_path, verbose=0))
    for a, b in zip(weights, again, strict=True):
        np.testing.assert_array_equal(a, b)


def state_of(model) -> dict[str, list[np.ndarray]]:
    return {"weights": model.get_weights(),
            "optimizer": [v.numpy().copy() for v in model.optimizer.variables]}


def test_resume_restores_the_checkpoint_and_ends_where_an_uninterrupted_run_ends(
        uninterrupted, resume_split, tmp_path):
    cfg, weights = uninterrupted
    at_interrupt, at_resume = {}, {}

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == INTERRUPT_AFTER:
                at_interrupt.update(state_of(self.model))
                raise KeyboardInterrupt

    class Resumed(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            at_resume.update(state_of(self.model))

    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, resume_split, out, callbacks=(Interrupt(),), verbose=0)
    assert not modeldir.list_versions(out)
    version = training.train(cfg, resume_split, out, resume=True,
                             callbacks=(Resumed(),), verbose=0)

    # the resumed model starts from the checkpoint, not from fresh weights or a fresh optimizer
    for part in ("weights", "optimizer"):
        assert len(at_resume[part]) == len(at_interrupt[part]), part
        for a, b in zip(at_interrupt[part], at_resume[part], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=part)
    steps = 128 // 32
    assert int(at_resume["optimizer"][0]) == INTERRUPT_AFTER * steps  # the step count
    # and finishes where the uninterrupted run with the same seed finished
    for a, b in zip(weights, final_weights(version), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=RESUME_TOLERANCE)
    assert [int(r["epoch"]) for r in log_rows(version)] == [0, 1, 2, 3, 4]
    assert version.name == "1"


# --- progressive resizing ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def progressive_run(dataset, tmp_path_factory):
    """One CLI run whose first epoch trains at 24 px, with a validation split."""
    out = tmp_path_factory.mktemp("progressive") / "out"
    result = CliRunner().invoke(main, [
        "train", "--data", str(dataset), "--out", str(out), "--preset", "quick",
        "--epochs", "2", "--batch-size", "32", "--progressive", "24:1", "--val-split", "0.25",
        "--no-cache"])
    assert result.exit_code == 0, result.output
    return out / "1", result.output


def test_progressive_training_publishes_a_full_size_model(progressive_run):
    import onnx

    version, output = progressive_run
    assert "2 epochs (the first 1 at 24x24)" in output
    config = json.loads((version / "config.json").read_text())
    metrics = json.loads((version / "metrics.json").read_text())
    assert config["progressive"] == [24, 1] and metrics["image_size"] == 32
    published = keras.models.load_model(version / "model.keras", compile=False)
    assert tuple(published.input.shape) == (None, 32, 32, 3)
    graph_input = onnx.load(str(version / "model.onnx")).graph.input[0]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim][1:] == [32, 32, 3]
    assert metrics["onnx_max_abs_diff"] <= 1e-4 and metrics["accuracy"] > 0.5
    rows = log_rows(version)  # both epochs scored on the held-out images, at 32 px
    assert len(rows) == 2 and all(0 <= float(r["val_accuracy"]) <= 1 for r in rows)


@pytest.mark.parametrize(("change", "message"), [
    (dict(progressive=(8, 1)), "at least 16 px"),
    (dict(progressive=(32, 1)), "less than the images' 32 px"),
    (dict(progressive=(24, 0)), "more than 0"),
    (dict(progressive=(24, 3)), "fewer than the run's 3"),
    (dict(progressive=(24, 1), preset="tutorial"), "not with the tutorial preset"),
    (dict(progressive=(24, 1), augment="photo"), "not with --augment photo"),
    (dict(progressive=(24, 1), loop="device"), "--loop device does not work with.*--progressive"),
])
def test_progressive_values_that_cannot_run_are_refused(resume_split, tmp_path, change, message):
    cfg = training.TrainConfig(**{"preset": "quick", "epochs": 3, "batch_size": 32, **change})
    with pytest.raises(training.TrainError, match=message):
        training.train(cfg, resume_split, tmp_path, verbose=0)
    assert not (tmp_path / "1").exists()


def test_progressive_is_for_tensorflow_s_fit_loop_only():
    from convnet.train.config import check_progressive

    cfg = training.TrainConfig(preset="quick", epochs=3, image_size=32, progressive=(24, 1))
    check_progressive(cfg, "fit", "tensorflow")
    with pytest.raises(training.TrainError, match="not with the jax backend"):
        check_progressive(cfg, "fit", "jax")


@pytest.mark.parametrize("value", ["24", "24:x", "0:2", "24:0", ":", "24:-1"])
def test_a_malformed_progressive_option_is_a_usage_error(value):
    result = CliRunner().invoke(main, ["train", "--data", ".", "--progressive", value])
    assert result.exit_code == 2 and "SIZE:EPOCHS" in result.output


def test_progressive_off_is_an_accepted_value(tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path),
                                       "--progressive", "off"])
    assert "no images found" in result.output and "SIZE:EPOCHS" not in result.output


class TraceCount(keras.callbacks.Callback):
    """The input shapes the train step is traced with: Keras calls `model.train_step` in
    Python only while tracing it into a graph."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def set_model(self, model):  # before fit makes its train function
        super().set_model(model)
        if "train_step" not in vars(model):
            step = model.train_step

            def counted(data):
                self.shapes.append(tuple(data[0].shape))
                return step(data)

            model.train_step = counted


PROGRESSIVE_CFG = training.TrainConfig(preset="quick", epochs=4, batch_size=32, tta=False,
                                       progressive=(24, 2))


@pytest.fixture(scope="module")
def progressive_uninterrupted(resume_split, tmp_path_factory):
    """(final weights, train step traces) of an uninterrupted progressive run."""
    traces = TraceCount()
    version = training.train(PROGRESSIVE_CFG, resume_split, tmp_path_factory.mktemp("prog"),
                             callbacks=(traces,), verbose=0)
    return final_weights(version), traces.shapes


def test_progressive_traces_the_train_step_no_more_often_than_a_plain_run(
        progressive_uninterrupted, resume_split, tmp_path):
    _, shapes = progressive_uninterrupted
    plain = TraceCount()
    training.train(replace(PROGRESSIVE_CFG, progressive=config.PROGRESSIVE_OFF), resume_split,
                   tmp_path,
                   callbacks=(plain,), verbose=0)
    assert len(shapes) == len(plain.shapes)  # no retrace at the switch, none per step
    assert all(s[1:] == (None, None, 3) for s in shapes)  # one graph for both sizes
    assert all(s[1:] == (32, 32, 3) for s in plain.shapes)  # and the plain run's is as before


def test_progressive_resumed_after_a_low_resolution_epoch_ends_as_an_uninterrupted_run(
        progressive_uninterrupted, resume_split, tmp_path):
    weights, _ = progressive_uninterrupted

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:  # of the two at 24 px
                raise KeyboardInterrupt

    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        training.train(PROGRESSIVE_CFG, resume_split, out, callbacks=(Interrupt(),), verbose=0)
    version = training.train(PROGRESSIVE_CFG, resume_split, out, resume=True, verbose=0)
    for a, b in zip(weights, final_weights(version), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=RESUME_TOLERANCE)
    assert [int(r["epoch"]) for r in log_rows(version)] == [0, 1, 2, 3]


def test_fast_with_muon_resizes_progressively_by_default_only_with_its_own_epochs():
    from convnet.train.config import TrainConfig, default_progressive

    fast = TrainConfig(preset="fast", optimizer="muon", epochs=11, image_size=32)
    assert default_progressive(fast, "fit", "tensorflow", epochs_given=False) == (24, 5)
    assert default_progressive(replace(fast, image_size=64, epochs=22), "fit", "tensorflow",
                               epochs_given=False) == (48, 10)
    for cfg, loop, backend, given in (
            (fast, "fit", "tensorflow", True),  # --epochs N: all at full size
            (replace(fast, optimizer="sgd"), "fit", "tensorflow", False),
            (replace(fast, preset="quick", epochs=8), "fit", "tensorflow", False),
            (replace(fast, augment="photo"), "fit", "tensorflow", False),
            (fast, "device", "jax", False), (fast, "fit", "jax", False)):
        assert default_progressive(cfg, loop, backend, epochs_given=given) is None
