"""Other backends and data-parallel training, each in a fresh process (the backend and the
device count are fixed when Keras and XLA start).

JAX sees two CPU devices through XLA_FLAGS; TensorFlow gets two logical CPU devices. Multi-host
training runs two `convnet train --distributed` processes on one machine, over loopback."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

pytest.importorskip("keras")

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    if {tf_devices}:
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * {tf_devices})
    import keras
    from synthetic import tar_folder, write_image_folder
    from convnet.data import load_dataset
    from convnet.train import TrainConfig, train

    root = Path({root!r})
    write_image_folder(root / "src", per_class=40, num_classes=3)
    splits = load_dataset(tar_folder(root / "src", root / "d.tar.gz", "d"), cache=False)
    results = {{}}
    for parallel in (False, True):
        cfg = TrainConfig(preset="quick", epochs=3, batch_size=32, tta=False,
                          data_parallel=parallel)
        version = train(cfg, splits["train"], root / "out", test_split=splits["test"],
                        verbose=0)
        m = json.loads((version / "metrics.json").read_text())
        results[str(parallel)] = [m["replicas"], m["accuracy"], str(version)]
    print("RESULT", json.dumps({{"backend": keras.backend.backend(), **results}}))
""")


def _run(tmp_path, env_extra, tf_devices=0):
    script = SCRIPT.format(tests=os.path.dirname(__file__), root=str(tmp_path),
                           tf_devices=tf_devices)
    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _check(result):
    single_replicas, single_acc, _ = result["False"]
    multi_replicas, multi_acc, _ = result["True"]
    assert single_replicas == 1 and multi_replicas == 2
    # Three colour classes, 3 short epochs: both must learn, and agree within noise.
    assert single_acc > 0.6 and multi_acc > 0.6
    assert abs(single_acc - multi_acc) < 0.2


def test_tensorflow_mirrored_strategy_on_two_logical_cpus(tmp_path):
    result = _run(tmp_path, {"KERAS_BACKEND": "tensorflow"}, tf_devices=2)
    assert result["backend"] == "tensorflow"
    _check(result)


def test_jax_backend_data_parallel_and_export_on_tensorflow(tmp_path):
    pytest.importorskip("jax")
    result = _run(tmp_path, {"KERAS_BACKEND": "jax",
                             "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result["backend"] == "jax"
    _check(result)
    # A JAX-trained model has no ONNX yet; it exports on the TensorFlow backend, as a model
    # trained on the GPU machine would be exported here.
    from convnet.cli import main

    # The published version stays as it is; the export is published as the next version.
    version = result["True"][2]
    assert not os.path.exists(os.path.join(version, "model.onnx"))
    out = CliRunner().invoke(main, ["export", "--model", version, "--format", "onnx"])
    assert out.exit_code == 0, out.output
    following = os.path.join(os.path.dirname(version), str(int(os.path.basename(version)) + 1))
    assert out.output.strip() == os.path.join(following, "model.onnx")
    assert os.path.exists(os.path.join(following, "model.onnx"))
    assert not os.path.exists(os.path.join(version, "model.onnx"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Two processes of one CPU device each against one process of two: the same global batch of
# 32 over the same two-device mesh, so only the order of the sums may differ.
WEIGHT_TOLERANCE = 1e-4


@pytest.mark.slow
def test_two_processes_over_loopback_train_as_one_process(tmp_path):
    pytest.importorskip("jax")
    from synthetic import tar_folder, write_image_folder

    write_image_folder(tmp_path / "src", per_class=40, num_classes=3)
    data = tar_folder(tmp_path / "src", tmp_path / "d.tar.gz", "d")
    command = [sys.executable, "-m", "convnet", "train", "--data", str(data), "--preset",
               "quick", "--epochs", "2", "--batch-size", "32", "--seed", "0", "--no-tta",
               "--no-cache"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["KERAS_BACKEND"] = "jax"
    cluster = {"CONVNET_COORDINATOR": f"127.0.0.1:{_free_port()}",
               "CONVNET_NUM_PROCESSES": "2"}
    started = time.time()
    runs = [subprocess.Popen(command + ["--out", str(tmp_path / f"host{i}"), "--distributed"],
                             env={**env, **cluster, "CONVNET_PROCESS_ID": str(i)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    runs.append(subprocess.Popen(
        command + ["--out", str(tmp_path / "single"), "--data-parallel"],
        env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [run.communicate(timeout=300) for run in runs]
    finally:
        for run in runs:
            run.kill()
    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-3000:]
    print(f"three runs in {time.time() - started:.0f} s")
    assert "process 1: done; process 0 published version 1" in outputs[1][0]
    # Process 0 checkpoints and publishes; process 1 writes nothing.
    assert (tmp_path / "host0" / "1" / "model.keras").is_file()
    assert not (tmp_path / "host1").exists()
    import keras

    from convnet import models  # noqa: F401  (registers the custom layers)

    multi = keras.models.load_model(tmp_path / "host0" / "1" / "model.keras", compile=False)
    single = keras.models.load_model(tmp_path / "single" / "1" / "model.keras", compile=False)
    diff = max(float(abs(a - b).max()) for a, b in zip(multi.get_weights(),
                                                         single.get_weights(), strict=True))
    print(f"largest weight difference {diff:.2e}")
    assert diff < WEIGHT_TOLERANCE


@pytest.mark.parametrize("environ, message", [
    ({}, "needs CONVNET_COORDINATOR, CONVNET_NUM_PROCESSES, CONVNET_PROCESS_ID"),
    ({"CONVNET_COORDINATOR": "host0", "CONVNET_NUM_PROCESSES": "2", "CONVNET_PROCESS_ID": "0"},
     "host:port"),
    ({"CONVNET_COORDINATOR": "h:1", "CONVNET_NUM_PROCESSES": "two", "CONVNET_PROCESS_ID": "0"},
     "must be integers"),
    ({"CONVNET_COORDINATOR": "h:1", "CONVNET_NUM_PROCESSES": "2", "CONVNET_PROCESS_ID": "2"},
     "must be in 0..CONVNET_NUM_PROCESSES-1"),
])
def test_distributed_refuses_an_incomplete_cluster(environ, message):
    from convnet.train import TrainError, multihost

    with pytest.raises(TrainError, match=message):
        multihost.cluster_from_env(environ)


def test_distributed_needs_the_jax_backend():
    import keras

    from convnet.train import TrainError, multihost

    if keras.backend.backend() == "jax":
        pytest.skip("this process runs on JAX")
    cluster = multihost.cluster_from_env({"CONVNET_COORDINATOR": "h:1",
                                          "CONVNET_NUM_PROCESSES": "2",
                                          "CONVNET_PROCESS_ID": "1"})
    assert cluster == multihost.Cluster("h:1", 2, 1)
    with pytest.raises(TrainError, match="needs the JAX backend"):
        multihost.initialize(cluster)
