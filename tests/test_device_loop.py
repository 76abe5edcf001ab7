"""The JAX device loop (convnet.device_loop): the GPU fast path, run here on JAX's CPU backend in a
fresh process (the backend is fixed when Keras starts)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("keras")

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import numpy as np, jax, jax.numpy as jnp
    from click.testing import CliRunner
    from synthetic import make_images, tar_folder, write_image_folder
    from convnet import device_loop
    from convnet.cli import main

    out = {{}}
    x, y = make_images(128, 3, seed=0)
    tx, ty = make_images(60, 3, seed=1)
    recipe = device_loop.Recipe(epochs=2.5, batch_size=32, seed=3)
    by_step = device_loop.trainer("quick", 3, 32, len(x), "float32", scan=False)
    result = by_step.run(x, y, tx, ty, recipe)
    out["accuracy"], out["epochs"] = result.accuracy, result.epochs
    out["history"] = result.history
    # the Keras model gets exactly the trained weights
    model = result.to_keras()
    plain, _ = by_step.predict(result.trainable, result.non_trainable, tx)
    out["keras_vs_device"] = float(np.abs(np.asarray(model.predict(tx, verbose=0))
                                          - np.asarray(plain)).max())
    values = dict(zip(by_step.trainable_paths, result.trainable))
    initial = dict(zip(by_step.trainable_paths,
                       by_step._init(jax.random.key(0), jnp.asarray(x))[0]))
    out["whiten_kernel_change"] = float(np.abs(
        values["whiten/kernel"] - np.asarray(initial["whiten/kernel"])).max())
    out["whiten_bias_norm"] = float(np.abs(values["whiten/bias"]).max())
    # one compiled scan per epoch computes what one call per step does
    short = device_loop.Recipe(epochs=1, batch_size=32, seed=5)
    a = by_step.run(x, y, recipe=short)
    b = device_loop.trainer("quick", 3, 32, len(x), "float32", scan=True).run(x, y, recipe=short)
    out["scan_vs_step"] = max(float(np.abs(p - q).max())
                              for p, q in zip(a.trainable, b.trainable))
    # the command line picks the device loop by itself on JAX
    root = Path({root!r})
    write_image_folder(root / "src", per_class=40, num_classes=3)
    data = tar_folder(root / "src", root / "d.tar.gz", "d")
    cli = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(root / "out"),
                                    "--preset", "quick", "--epochs", "1.5",
                                    "--batch-size", "32"])
    out["cli_exit"], out["cli_output"] = cli.exit_code, cli.output[-2000:]
    fit = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(root / "out"),
                                    "--preset", "quick", "--epochs", "1.5", "--loop", "fit",
                                    "--batch-size", "32"])
    out["fit_exit"], out["fit_output"] = fit.exit_code, fit.output[-500:]
    print("RESULT", json.dumps(out))
""")


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    pytest.importorskip("jax")
    root = tmp_path_factory.mktemp("device_loop")
    script = SCRIPT.format(tests=os.path.dirname(__file__), root=str(root))
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return root, json.loads(line[len("RESULT "):])


def test_device_loop_learns_and_hands_weights_to_keras(jax_run):
    _, r = jax_run
    assert r["accuracy"] > 0.8  # three colour classes
    assert r["epochs"] == 2.5 and [h["epoch"] for h in r["history"]] == [0, 1, 2]
    assert r["history"][-1]["loss"] < r["history"][0]["loss"]
    assert r["keras_vs_device"] < 1e-4


def test_whitening_kernel_frozen_and_bias_trained(jax_run):
    _, r = jax_run
    assert r["whiten_kernel_change"] < 1e-5
    assert r["whiten_bias_norm"] > 0


def test_scan_and_per_step_loops_agree(jax_run):
    _, r = jax_run
    assert r["scan_vs_step"] < 1e-4


def test_cli_uses_device_loop_on_jax(jax_run):
    root, r = jax_run
    assert r["cli_exit"] == 0, r["cli_output"]
    version = root / "out" / "1"
    metrics = json.loads((version / "metrics.json").read_text())
    # 120 images, batches of 32: 3 steps an epoch, so 1.5 epochs round up to 5 steps
    assert metrics["backend"] == "jax" and metrics["epochs"] == pytest.approx(5 / 3, abs=1e-3)
    assert (version / "model.keras").is_file() and (version / "log.csv").is_file()
    # model.fit runs fractional epochs too, rounding the part-epoch up the same way
    assert r["fit_exit"] == 0, r["fit_output"]
    fit_metrics = json.loads((root / "out" / "2" / "metrics.json").read_text())
    assert fit_metrics["epochs"] == pytest.approx(5 / 3, abs=1e-3)


def test_device_loop_on_tensorflow_is_refused(tmp_path):
    from synthetic import tar_folder, write_image_folder

    from convnet.cli import main

    write_image_folder(tmp_path / "src", per_class=4, num_classes=3)
    data = tar_folder(tmp_path / "src", tmp_path / "d.tar.gz", "d")
    out = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(tmp_path / "o"),
                                    "--loop", "device", "--batch-size", "4"])
    assert out.exit_code == 2
    assert "--loop device does not work with the tensorflow backend" in out.output


def test_schedules():
    from convnet import optim

    f = optim.lr_factors(100, 0.2, 0.23, 0.07)
    assert len(f) == 101 and f[0] == pytest.approx(0.2) and f[-1] == pytest.approx(0.07)
    assert f.max() == pytest.approx(1.0) and int(np.argmax(f)) == 23
    d = optim.lookahead_decays(100)
    assert d[0] == 0 and d[-1] == pytest.approx(0.95**5) and np.all(np.diff(d) >= 0)
