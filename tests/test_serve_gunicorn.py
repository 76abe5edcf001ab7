"""The real server: gunicorn with several workers, spoken to over HTTP, stopped with Ctrl-C."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time

import pytest
from conftest import http

pytestmark = pytest.mark.slow

REQUESTS = 24


def test_real_server_end_to_end(live_server_factory, model_root, red_png):
    # -X importtime makes every process (master and forked workers) log each module it imports,
    # whenever it imports it: proof from the outside that no request pulled in TensorFlow.
    server = live_server_factory(model_root, workers=2, threads=2,
                                 python_flags=("-X", "importtime"))
    url = server.url

    status, headers, body = http("GET", url + "/")
    assert status == 200 and b"upload-form" in body
    for _ in range(REQUESTS):  # a new connection each time, so both workers get some
        status, _, body = http("POST", url + "/api/v1/predict", red_png,
                               {"Content-Type": "image/png"})
        assert status == 200 and json.loads(body)["predictions"][0]["label"] == "airplane"
    b64 = base64.b64encode(red_png).decode()
    status, _, body = http("POST", url + "/v1/models/cifar10:predict",
                           json.dumps({"instances": [{"b64": b64}]}).encode())
    assert status == 200 and len(json.loads(body)["predictions"][0]) == 10
    v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]}
    status, _, body = http("POST", url + "/v2/models/cifar10/infer", json.dumps(v2).encode(),
                           {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["outputs"][0]["shape"] == [1, 10]

    # Over the 10 MB limit: the client still reads a JSON 413, not a connection reset.
    status, headers, body = http("POST", url + "/api/v1/predict", b"x" * (11 * 1024 * 1024),
                                 {"Content-Type": "image/png"}, timeout=30)
    assert status == 413 and "limit is" in json.loads(body)["error"]

    # Prometheus samples are summed over both workers.
    _, _, body = http("GET", url + "/metrics")
    text = body.decode()
    line = re.search(r'convnet_http_requests_total\{[^}]*route="/api/v1/predict"[^}]*'
                     r'status="200"[^}]*\} (\S+)', text)
    assert line and float(line.group(1)) == REQUESTS
    assert "convnet_inference_batch_images_bucket" in text
    # One model-version sample per live worker. The server is ready when its first worker
    # answers; under load the second may still be booting, so give it a bounded while.
    deadline = time.monotonic() + 30
    while len(re.findall(r"convnet_model_version\{pid=", text)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        text = http("GET", url + "/metrics")[2].decode()
    assert len(re.findall(r"convnet_model_version\{pid=", text)) == 2

    out, err = server.stop()
    assert server.process.returncode == 0, err[-3000:]
    assert f"serving cifar10 version 1 at {url}/" in out
    assert "convnet: stopped" in err
    imported = set(re.findall(r"import time:\s+\d+ \|\s+\d+ \| +([\w.]+)", err))
    assert "onnxruntime" in imported, "importtime did not capture the workers"
    assert not {m for m in imported if m.split(".")[0] in ("tensorflow", "keras")}


NO_TF_SCRIPT = """
import base64, json, sys
from convnet.serve import create_app
client = create_app({"MODEL_DIR": sys.argv[1], "RELOAD_INTERVAL": 0}).test_client()
png = open(sys.argv[2], "rb").read()
b64 = base64.b64encode(png).decode()
answers = [
    client.get("/").status_code,
    client.post("/", data={"file": (open(sys.argv[2], "rb"), "a.png")}).status_code,
    client.post("/api/v1/predict", data=png, content_type="image/png").status_code,
    client.post("/v1/models/cifar10:classify",
                json={"examples": [{"i": {"b64": b64}}]}).status_code,
    client.post("/v2/models/cifar10/infer", json={"inputs": [
        {"name": "i", "shape": [1], "datatype": "BYTES", "data": [b64]}]}).status_code,
    client.get("/metrics").status_code,
]
print(json.dumps({"answers": answers,
                  "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules}))
"""


def test_serving_never_imports_tensorflow(model_root, red_png, tmp_path):
    image = tmp_path / "red.png"
    image.write_bytes(red_png)
    result = subprocess.run([sys.executable, "-c", NO_TF_SCRIPT, str(model_root), str(image)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"answers": [200] * 6, "tensorflow": False, "keras": False}
