"""Operations routes (health, readiness, metrics, OpenAPI) and configuration."""

from __future__ import annotations

import logging
import re

import pytest
from conftest import TINY_WEIGHTS, write_version
from prometheus_client import generate_latest

from convnet.serve import DEFAULTS, create_app
from convnet.serve.metrics import MULTIPROC_ENV, ServeMetrics
from convnet.serve.model import load_model


def test_healthz(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_readyz(client, model_root):
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["ready"] is True and body["refused"] == []
    assert body["model"]["name"] == "cifar10" and body["model"]["version"] == 1
    assert "path" not in body["model"]


def test_readyz_without_model(tmp_path):
    client = create_app({"MODEL_DIR": str(tmp_path / "none"), "RELOAD_INTERVAL": 0}).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["ready"] is False
    assert "holds no model version yet" in response.get_json()["reason"]
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get("/healthz").status_code == 200


# Every GET a client can make, and POSTs that reach the version and model checks.
LEAK_PROBES = [
    ("GET", "/readyz"), ("GET", "/"), ("GET", "/metrics"), ("GET", "/openapi.json"),
    ("GET", "/v1/models/cifar10"), ("GET", "/v1/models/cifar10/versions/2"),
    ("GET", "/v1/models/cifar10/versions/3/metadata"), ("GET", "/v2/models/cifar10/versions/2"),
    ("GET", "/v2/models/cifar10/versions/3/ready"), ("GET", "/v2/health/ready"),
    ("POST", "/v1/models/cifar10/versions/2:predict"), ("POST", "/v2/models/cifar10/infer"),
    ("POST", "/api/v1/predict"), ("POST", "/"),
]


@pytest.mark.parametrize("serving", [True, False], ids=["v1 serving", "nothing serving"])
def test_no_answer_reveals_paths_or_library_errors(tmp_path, caplog, serving):
    """Versions 2 (ONNX Runtime's error names the file) and 3 (no labels) are refused; clients
    learn the model name, the versions and a short reason, the log learns where and why."""
    root = tmp_path / "cifar10"
    if serving:
        write_version(root, 1)
    write_version(root, 2, onnx_bytes=b"not a model")
    (write_version(root, 3) / "labels.json").unlink()
    with caplog.at_level(logging.INFO, logger="convnet.serve"):
        client = create_app({"MODEL_DIR": str(root), "RELOAD_INTERVAL": 0}).test_client()
    for method, url in LEAK_PROBES:
        response = client.open(url, method=method, json={"instances": []})
        text = response.get_data(as_text=True)
        assert str(tmp_path) not in text and "ONNXRuntimeError" not in text, (url, text[:500])
    readyz = client.get("/readyz").get_json()
    assert [(r["version"], r["reason"]) for r in readyz["refused"]] == [
        (2, "ONNX Runtime cannot load model.onnx"), (3, "labels.json is missing or invalid")]
    if not serving:
        assert readyz["reason"] == "version 2 was refused: ONNX Runtime cannot load model.onnx"
    assert str(root / "2") in caplog.text and "ONNXRuntimeError" in caplog.text


def sample(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample in exposition text."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == str(v) for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} {labels} not in metrics")


def test_metrics_count_requests_latency_and_batches(client, red_png):
    for _ in range(3):
        client.post("/api/v1/predict", data=red_png, content_type="image/png")
    client.post("/api/v1/predict", data=b"junk", content_type="image/png")
    client.post("/v2/models/cifar10/infer", json={"inputs": [{
        "name": "x", "shape": [2, 32, 32, 3], "datatype": "UINT8", "data": [0] * 6144}]})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    route = "/api/v1/predict"
    assert sample(text, "convnet_http_requests_total", route=route, status=200) == 3
    assert sample(text, "convnet_http_requests_total", route=route, status=400) == 1
    assert sample(text, "convnet_http_request_duration_seconds_count", route=route) == 4
    assert sample(text, "convnet_inference_batch_images_count") == 4
    assert sample(text, "convnet_inference_batch_images_bucket", le="1.0") == 3
    assert sample(text, "convnet_inference_batch_images_sum") == 5
    assert sample(text, "convnet_model_version") == 1
    assert sample(text, "convnet_model_loads_total", result="loaded") == 1


def test_metrics_give_each_loaded_versions_memory(fresh_root):
    """At least the .onnx file (the session holds its weights), far under a gigabyte for the
    tiny model; the version a hot reload replaces leaves /metrics."""
    client = create_app({"MODEL_DIR": str(fresh_root), "RELOAD_INTERVAL": 0}).test_client()
    holder = client.application.extensions["convnet.registry"].served.default
    memory = "convnet_model_memory_bytes"
    v1 = dict(model="cifar10", version=1, precision="float")
    onnx_bytes = (fresh_root / "1" / "model.onnx").stat().st_size
    assert onnx_bytes <= sample(client.get("/metrics").text, memory, **v1) < 2**30
    assert holder.current.memory_bytes == sample(client.get("/metrics").text, memory, **v1)

    write_version(fresh_root, 2, weights=TINY_WEIGHTS[2])
    holder.poll()
    holder.poll()
    text = client.get("/metrics").text
    assert onnx_bytes <= sample(text, memory, **{**v1, "version": 2}) < 2**30
    with pytest.raises(KeyError):
        sample(text, memory, **v1)


def test_a_replaced_versions_memory_is_zeroed_under_gunicorn(fresh_root, monkeypatch, tmp_path):
    """prometheus_client cannot remove a series from the workers' shared files, so the
    replaced version is set to 0 there (and remove(), which would only warn, is not called)."""
    metrics = ServeMetrics()
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    metrics.model_loaded(load_model(fresh_root / "1"))
    metrics.model_loaded(load_model(write_version(fresh_root, 2, weights=TINY_WEIGHTS[2])))
    text = generate_latest(metrics.registry).decode()
    assert sample(text, "convnet_model_memory_bytes", version=1) == 0
    assert sample(text, "convnet_model_memory_bytes", version=2) > 0


def test_openapi_describes_every_route(app, client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        served |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert documented == served
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', client.get("/openapi.json").text))
    assert refs <= set(spec["components"]["schemas"])


def test_settings_from_environment(model_root, monkeypatch):
    monkeypatch.setenv("CONVNET_MODEL_DIR", str(model_root))
    monkeypatch.setenv("CONVNET_MAX_IMAGES_PER_REQUEST", "7")
    monkeypatch.setenv("CONVNET_RELOAD_INTERVAL", "0")
    app = create_app({"MAX_CONTENT_LENGTH": 1234})
    assert app.config["MODEL_DIR"] == str(model_root)
    assert app.config["MAX_IMAGES_PER_REQUEST"] == 7
    assert app.config["MAX_CONTENT_LENGTH"] == 1234  # the argument beats the environment
    assert app.config["MAX_IMAGE_PIXELS"] == DEFAULTS["MAX_IMAGE_PIXELS"]
    assert app.config["CORS_ORIGINS"] == []
