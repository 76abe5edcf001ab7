"""The command line as a terminal or a log sees it: an input error is one line on stderr, with
TensorFlow's start-up notices kept out unless -v."""

import os
import pickle
import subprocess
import sys

import pytest
from click.testing import CliRunner
from synthetic import write_cifar_batches

from convnet.cli import main


def run_cli(*args, cwd, **extra_env) -> subprocess.CompletedProcess:
    """`python -m convnet ARGS` in a fresh process, with TensorFlow's log level left to us."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["CONVNET_CACHE_DIR"] = str(cwd / "cache")
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "convnet", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_refused_pickle_is_one_line_on_stderr(tmp_path):
    folder = write_cifar_batches(tmp_path / "cifar", per_batch=4)
    (folder / "data_batch_2").write_bytes(pickle.dumps(_Evil(), protocol=2))
    proc = run_cli("train", "--data", str(folder), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("Error: ") and "data_batch_2" in proc.stderr
    assert "forbidden global" in proc.stderr


def test_an_unknown_keras_backend_is_one_line_naming_the_choices(tmp_path):
    folder = write_cifar_batches(tmp_path / "cifar", per_batch=4)
    result = run_cli("train", "--data", str(folder), "--out", str(tmp_path / "out"),
                     "--dry-run", cwd=tmp_path, KERAS_BACKEND="tensorflw")
    assert result.returncode == 2
    assert result.stderr.strip() == ("Error: KERAS_BACKEND=tensorflw is not a backend convnet "
                                      "supports: choose tensorflow, jax, torch (tensorflow when "
                                      "unset)")


def test_an_error_after_tensorflow_loaded_is_still_one_line(tmp_path):
    pytest.importorskip("keras")
    # the bundled model ships ONNX only, so there is no model.keras to export from
    proc = run_cli("export", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert "has no model.keras" in proc.stderr


@pytest.mark.parametrize(("args", "level"), [((), "2"), (("-v",), None)])
def test_verbose_leaves_tensorflow_its_own_log_level(monkeypatch, args, level):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    result = CliRunner().invoke(main, [*args, "download", "--help"])
    assert result.exit_code == 0
    assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") == level
