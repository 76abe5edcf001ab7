"""Shared fixtures: a tiny ONNX model in a TF Serving-style model root, the Flask app and client,
and helpers to make images and to run the real (gunicorn) server in a subprocess."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer",
                  "dog", "frog", "horse", "ship", "truck"]
# (3, 10): mean R, G, B (each 0..1) -> logits. Version 2 swaps the rows so predictions change.
TINY_WEIGHTS = {
    1: np.array([[6, 0, 0, 2, 0, 0, 0, 1, 0, 0],    # red images -> airplane
                 [0, 6, 0, 0, 2, 0, 0, 0, 1, 0],    # green -> automobile
                 [0, 0, 6, 0, 0, 2, 0, 0, 0, 1]],   # blue -> bird
                dtype=np.float32),
}
TINY_WEIGHTS[2] = TINY_WEIGHTS[1][[2, 0, 1]]  # red -> bird, green -> airplane, blue -> automobile
SERVER_START_TIMEOUT = 30  # seconds for gunicorn to boot and answer /readyz


Dim = int | str  # a fixed ONNX dimension, or a symbolic one by name


def build_tiny_onnx(weights: np.ndarray, batch: Dim = "N",
                    size: Dim | tuple[Dim, Dim] = 32) -> bytes:
    """uint8 (N, S, S, 3) -> Cast -> /255 -> ReduceMean over H, W -> MatMul (3, C) -> Softmax:
    a solid colour gets the same answer at any S. `batch`: the graph's first dimension, symbolic
    by default; `size`: S, or (height, width), either of them possibly symbolic."""
    from onnx import TensorProto, helper, numpy_helper

    num_classes = weights.shape[1]
    height, width = size if isinstance(size, tuple) else (size, size)
    nodes = [
        helper.make_node("Cast", ["pixels"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["as_float", "scale"], ["scaled"]),
        helper.make_node("ReduceMean", ["scaled"], ["channel_mean"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["channel_mean", "weights"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [batch, height, width, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, num_classes])],
        initializer=[
            numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
            numpy_helper.from_array(weights.astype(np.float32), "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the project allows
    return model.SerializeToString()


def write_version(root: Path, version: int, *, weights=None, onnx_bytes: bytes | None = None,
                  labels=None, metrics=None, size: int = 32, config=None) -> Path:
    """Write `root/<version>/` via a hidden staging folder and a rename, as the exporter does.

    size: the tiny model's input side S. config: config.json's content; by default none for
    S = 32 (as the bundled model, which predates recording it) and {"image_size": S} otherwise.
    """
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{version}"
    staging.mkdir()
    if onnx_bytes is None:
        onnx_bytes = build_tiny_onnx(TINY_WEIGHTS[1] if weights is None else weights,
                                     size=size)
    (staging / "model.onnx").write_bytes(onnx_bytes)
    (staging / "labels.json").write_text(json.dumps(labels or CIFAR10_LABELS))
    (staging / "metrics.json").write_text(json.dumps(
        {"accuracy": 0.4321} if metrics is None else metrics))
    if config is None and size != 32:
        config = {"image_size": size}
    if config is not None:
        (staging / "config.json").write_text(json.dumps(config))
    target = root / str(version)
    os.rename(staging, target)
    return target


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    """A read-only model root `.../cifar10/1/`, built once per session."""
    root = tmp_path_factory.mktemp("models") / "cifar10"
    write_version(root, 1)
    return root


@pytest.fixture(scope="session")
def model_root_64(tmp_path_factory) -> Path:
    """Like model_root, but the model takes 64x64 images (and config.json says so)."""
    root = tmp_path_factory.mktemp("models64") / "cifar10"
    write_version(root, 1, size=64)
    return root


@pytest.fixture
def fresh_root(tmp_path, model_root) -> Path:
    """A writable copy of the model root, for tests that add versions."""
    root = tmp_path / "cifar10"
    shutil.copytree(model_root, root)
    return root


@pytest.fixture
def app(model_root):
    from convnet.serve import create_app

    return create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0, "TESTING": True})


@pytest.fixture
def client(app):
    return app.test_client()


def image_bytes(color=(255, 0, 0), size=(32, 32), fmt="PNG", **save_args) -> bytes:
    """An encoded, solid-colour image."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def red_png() -> bytes:
    return image_bytes((255, 0, 0))


@pytest.fixture(scope="session")
def green_jpeg() -> bytes:
    return image_bytes((0, 255, 0), fmt="JPEG", quality=95)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers=None, timeout=10):
    """(status, headers, body bytes) for one real HTTP request; errors are answers, not raises."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def interrupt(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGINT (Ctrl-C) to a server still running, then wait for it; kill it after `timeout` s."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LiveServer:
    """`convnet.serve.server.run` in a subprocess on a free port; stop() returns its output."""

    def __init__(self, model: Path | None, logs: Path, *, workers=2, threads=4, python_flags=(),
                 config=None, model_config: Path | None = None, setup: str = ""):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = (
            f"{setup}\n"  # Python run first, e.g. to pick another worker class
            "from convnet.serve.server import run; "
            f"run(model={str(model) if model else None!r}, port={self.port}, workers={workers}, "
            f"threads={threads}, config={config!r}, "
            f"model_config={str(model_config) if model_config else None!r})"
        )
        # Files, not pipes: a chatty server would block on a full pipe nobody reads yet.
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout.txt", logs / "stderr.txt"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen([sys.executable, *python_flags, "-c", code],
                                            stdout=out, stderr=err)
        self.output: tuple[str, str] | None = None
        self.workers = workers

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                out, err = self.stop()
                raise RuntimeError(f"server exited early:\n{out}\n{err[-4000:]}")
            with contextlib.suppress(OSError):
                if (http("GET", self.url + "/readyz", timeout=2)[0] == 200
                        and self.workers_serving() == self.workers):
                    return
            time.sleep(0.2)
        out, err = self.stop()
        raise RuntimeError(f"server not ready after {SERVER_START_TIMEOUT} s:\n{err[-4000:]}")

    def workers_serving(self) -> int:
        """How many workers have loaded a model and reached their accept loop: /readyz answers
        once the first one has, and a test that counts or kills workers needs all of them."""
        lines = http("GET", self.url + "/metrics", timeout=2)[2].decode().splitlines()
        loaded = sum(line.startswith("convnet_model_version") for line in lines)
        accepting = sum(line.startswith("convnet_worker_accepting") and line.endswith(" 1.0")
                        for line in lines)
        return min(loaded, accepting)

    def stop(self) -> tuple[str, str]:
        """SIGINT (Ctrl-C), as a person would stop it; returns (stdout, stderr)."""
        if self.output is None:
            interrupt(self.process)
            self.output = (self.stdout_path.read_text(errors="replace"),
                           self.stderr_path.read_text(errors="replace"))
        return self.output


@pytest.fixture
def live_server_factory(tmp_path):
    """Start real servers; every one is stopped at the end of the test."""
    servers: list[LiveServer] = []

    def start(model: Path | None, **kwargs) -> LiveServer:
        server = LiveServer(model, tmp_path / f"server-{len(servers)}", **kwargs)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()
