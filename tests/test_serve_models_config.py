"""Several models behind one server (MODEL_CONFIG): the config file and its mistakes, every door
with a model name, version or label, labels refused and the old mapping kept, hot reload per model
and of the file, the page's model picker, memory per version in /metrics, and real gunicorn."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_WEIGHTS, http, write_version

from convnet.cli import main
from convnet.modeldir import bundled_model_root
from convnet.serve import create_app
from convnet.serve.models_config import ConfigError, VersionPolicy, read_config

BETA_LABELS = ["red", "green", "blue"]
BETA_WEIGHTS = np.eye(3, dtype=np.float32) * 6  # a solid colour -> its own name
CONFIG = """\
models:
  - name: alpha
    base_path: alpha
    version_policy: {specific: [1, 2]}
    labels:
      stable: 1
      canary: 2
  - name: beta
    base_path: beta
"""


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> Path:
    """alpha/1 (red -> airplane), alpha/2 (red -> bird), beta/1 (red -> "red")."""
    folder = tmp_path_factory.mktemp("roots")
    write_version(folder / "alpha", 1)
    write_version(folder / "alpha", 2, weights=TINY_WEIGHTS[2])
    write_version(folder / "beta", 1, weights=BETA_WEIGHTS, labels=BETA_LABELS)
    return folder


def write_config(folder: Path, text: str, name: str = "models.yaml") -> Path:
    path = folder / name
    previous = path.stat().st_mtime_ns if path.exists() else None
    path.write_text(text)
    if previous is not None:  # a later, surely different mtime: the poll compares them
        os.utime(path, ns=(previous + 10**9, previous + 10**9))
    return path


def serve(config_path: Path, **settings):
    return create_app({"MODEL_CONFIG": str(config_path), "RELOAD_INTERVAL": 0, "TESTING": True,
                       "FEEDBACK_DB": "", **settings})


@pytest.fixture(scope="module")
def client(roots):
    return serve(write_config(roots, CONFIG)).test_client()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- the file ---------------------------------------------------------------------------------

def test_a_config_resolves_paths_policies_and_labels(roots):
    (roots / "nested").mkdir(exist_ok=True)
    path = write_config(roots / "nested", """\
models:
  - name: alpha
    base_path: ../alpha
    version_policy: all
  - name: petals
    base_path: flowers
  - {name: pinned, base_path: %s, version_policy: {specific: [2, 1]}, labels: {a: 2}}
""" % (roots / "alpha"))
    config = read_config(path)
    assert config.names == ["alpha", "petals", "pinned"]
    alpha, petals, pinned = config.models
    assert alpha.base_path.resolve() == (roots / "alpha").resolve()
    assert alpha.policy == VersionPolicy("all") and petals.policy.kind == "latest"
    assert petals.base_path == bundled_model_root("flowers")  # a bare bundled name
    assert pinned.policy == VersionPolicy("specific", (1, 2)) and pinned.labels == {"a": 2}


BAD_CONFIGS = [
    ("models:\n  - name: a\n    base_path: alpha\n  name: b\n", 4, "YAML syntax"),
    ("models:\n  - name: a\n    base_path: alpha\n    versions: all\n", 4,
     "unknown key 'versions'"),
    ("model:\n  - name: a\n", 1, "unknown key 'model' at the top"),
    ("models:\n  - name: a\n    labels: {x: 1}\n", 2, "models[0] has no base_path"),
    ("models:\n  - name: a\n    base_path: alpha\n  - name: a\n    base_path: beta\n", 4,
     "model name 'a' is used twice"),
    ("models:\n  - name: a\n    base_path: alpha\n    version_policy: {specific: [1]}\n"
     "    labels:\n      canary: 2\n", 6, "points at version 2, which version_policy specific"),
    ("models:\n  - name: a\n    base_path: alpha\n    version_policy: newest\n", 4,
     "version_policy 'newest' is unknown"),
    ("models:\n  - name: a\n    base_path: alpha\n    version_policy: {specific: []}\n", 4,
     "must list at least one version"),
    ("models:\n  - name: a\n    base_path: alpha\n    labels: {stable: 1}\n", 4,
     "labels need version_policy all"),
    ("models:\n  - name: a\n    base_path: alpha\n    version_policy: all\n"
     "    labels: {stable: two}\n", 5, "must be a version number"),
    ("models:\n  - name: a\n    base_path: nowhere\n", 3, "base_path 'nowhere': no folder"),
    ("models:\n  - name: a/b\n    base_path: alpha\n", 2, "name 'a/b' must be"),
    ("models:\n  - name: a\n    name: b\n    base_path: alpha\n", 3, "'name' is given twice"),
    ("models: []\n", 1, "at least one model"),
    ("", 1, "the file is empty"),
]


@pytest.mark.parametrize(("text", "line", "problem"), BAD_CONFIGS,
                         ids=[problem for _, _, problem in BAD_CONFIGS])
def test_a_config_mistake_is_refused_naming_its_line(roots, text, line, problem):
    path = write_config(roots, text, "bad.yaml")
    with pytest.raises(ConfigError) as caught:
        read_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert problem in message and "\n" not in message
    with pytest.raises(ConfigError, match=re.escape(f"{path}:{line}: ")):
        serve(path)  # the app refuses it too


def test_convnet_serve_refuses_a_bad_config_in_one_line(roots):
    path = write_config(roots, "models:\n  - name: a\n    base_path: alpha\n  oops\n", "cli.yaml")
    result = CliRunner().invoke(main, ["serve", "--model-config", str(path)])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert lines == [f"Error: {path}:4: YAML syntax: could not find expected ':'"], lines
    assert "Traceback" not in result.output


def test_model_dir_and_model_config_are_not_both_allowed(roots):
    with pytest.raises(ValueError, match="not both"):
        serve(write_config(roots, CONFIG), MODEL_DIR=str(roots / "beta"))


# --- every door -------------------------------------------------------------------------------

def top_label(body: dict) -> str:
    return body["predictions"][0]["label"]


@pytest.mark.parametrize(("query", "model", "version", "label"), [
    ("", "alpha", 2, "bird"),  # the first model is the default, at its newest version
    ("?model=alpha&version=1", "alpha", 1, "airplane"),
    ("?model=alpha&label=stable", "alpha", 1, "airplane"),
    ("?model=alpha&label=canary", "alpha", 2, "bird"),
    ("?model=beta", "beta", 1, "red"),
    ("?model=beta&version=1", "beta", 1, "red"),
])
def test_api_predict_takes_model_version_and_label(client, red_png, query, model, version,
                                                    label):
    response = client.post("/api/v1/predict" + query, data=red_png, content_type="image/png")
    body = response.get_json()
    assert response.status_code == 200, body
    assert (body["model"], body["version"], top_label(body)) == (model, version, label)
    assert response.headers["X-Model-Name"] == model
    assert response.headers["X-Model-Version"] == str(version)


@pytest.mark.parametrize(("path", "version", "top"), [
    ("/v1/models/alpha", "2", 2),
    ("/v1/models/alpha/versions/1", "1", 0),
    ("/v1/models/alpha/labels/stable", "1", 0),
    ("/v1/models/alpha/labels/canary", "2", 2),
    ("/v1/models/beta", "1", 0),
])
def test_tf_serving_predict_classify_metadata_by_version_and_label(client, red_png, path,
                                                                   version, top):
    instances = {"instances": [{"b64": b64(red_png)}]}
    predicted = client.post(path + ":predict", json=instances).get_json()
    assert predicted["model_spec"]["version"] == version
    assert int(np.argmax(predicted["predictions"][0])) == top
    classified = client.post(path + ":classify",
                             json={"examples": [{"image": {"b64": b64(red_png)}}]}).get_json()
    assert classified["model_spec"] == predicted["model_spec"]
    metadata = client.get(path + "/metadata").get_json()
    assert metadata["model_spec"]["version"] == version
    assert metadata["model_spec"]["name"] == path.split("/")[3]


def test_tf_serving_status_lists_every_loaded_version(client):
    status = client.get("/v1/models/alpha").get_json()["model_version_status"]
    assert [(s["version"], s["state"]) for s in status] == [("2", "AVAILABLE"), ("1", "AVAILABLE")]
    status = client.get("/v1/models/alpha/labels/stable").get_json()["model_version_status"]
    assert [s["version"] for s in status] == ["1"]


@pytest.mark.parametrize(("path", "model", "version", "top"), [
    ("/v2/models/alpha", "alpha", "2", 2),
    ("/v2/models/alpha/versions/1", "alpha", "1", 0),
    ("/v2/models/beta", "beta", "1", 0),
])
def test_v2_infer_ready_and_metadata_by_version(client, red_png, path, model, version, top):
    request = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                           "data": [b64(red_png)]}]}
    answer = client.post(path + "/infer", json=request).get_json()
    assert (answer["model_name"], answer["model_version"]) == (model, version)
    assert int(np.argmax(answer["outputs"][0]["data"])) == top
    assert client.get(path + "/ready").get_json() == {"name": model, "ready": True}
    metadata = client.get(path).get_json()
    assert metadata["name"] == model
    assert metadata["versions"] == (["1", "2"] if model == "alpha" else ["1"])


def test_the_model_page_works_per_model(client):
    page = client.get("/models/beta")
    assert page.status_code == 200 and "beta" in page.text and "green" in page.text
    assert client.get("/models/alpha").status_code == 200
    assert client.get("/models/gamma").status_code == 404


def test_readyz_lists_every_model_its_versions_and_labels(client):
    body = client.get("/readyz").get_json()
    assert body["ready"] and body["model"]["name"] == "alpha"
    assert [(m["name"], m["versions"], m["labels"]) for m in body["models"]] == [
        ("alpha", [1, 2], {"stable": 1, "canary": 2}), ("beta", [1], {})]


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/api/v1/predict?model=gamma"),
    ("POST", "/v1/models/gamma:predict"),
    ("POST", "/v1/models/gamma/labels/stable:predict"),
    ("GET", "/v1/models/gamma"),
    ("GET", "/v1/models/gamma/metadata"),
    ("POST", "/v2/models/gamma/infer"),
    ("GET", "/v2/models/gamma/versions/1/ready"),
])
def test_an_unknown_model_is_a_404_listing_the_served_ones(client, red_png, method, path):
    response = client.open(path, method=method, data=red_png, content_type="image/png")
    body = response.get_json()
    assert response.status_code == 404, body
    assert body["models"] == ["alpha", "beta"] and "'gamma' not found" in body["error"]


@pytest.mark.parametrize("path", ["/v1/models/alpha/labels/nightly:predict",
                                  "/api/v1/predict?model=alpha&label=nightly",
                                  "/v1/models/beta/labels/stable:predict"])
def test_an_unknown_label_is_a_404_listing_the_models_labels(client, red_png, path):
    response = client.post(path, data=red_png, content_type="image/png")
    body = response.get_json()
    assert response.status_code == 404, body
    assert body["models"] == ["alpha", "beta"]
    assert body["labels"] == ({} if "beta" in path else {"stable": 1, "canary": 2})


@pytest.mark.parametrize("path", ["/v1/models/alpha/versions/3:predict",
                                  "/v2/models/alpha/versions/3/infer",
                                  "/v2/models/alpha/versions/x/infer",
                                  "/api/v1/predict?model=beta&version=2",
                                  "/api/v1/predict?version=0"])
def test_an_unknown_version_is_a_404(client, red_png, path):
    response = client.post(path, data=red_png, content_type="image/png")
    assert response.status_code == 404, response.get_json()


def test_version_and_label_together_are_refused(client, red_png):
    response = client.post("/api/v1/predict?version=1&label=stable", data=red_png,
                           content_type="image/png")
    assert response.status_code == 400 and "not both" in response.get_json()["error"]


# --- labels at start and at reload ------------------------------------------------------------

def test_the_server_refuses_to_start_with_a_label_at_a_missing_version(roots):
    path = write_config(roots, "models:\n  - name: alpha\n    base_path: alpha\n"
                               "    version_policy: all\n    labels:\n      canary: 3\n",
                        "missing.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:6: label 'canary' of model "
                                                    "'alpha' points at version 3, which is "
                                                    "not loaded")):
        serve(path)


def test_the_server_refuses_to_start_with_a_label_at_a_refused_version(tmp_path):
    write_version(tmp_path / "alpha", 1)
    write_version(tmp_path / "alpha", 2, onnx_bytes=b"not an onnx model")
    path = write_config(tmp_path, "models:\n  - name: alpha\n    base_path: alpha\n"
                                  "    version_policy: all\n    labels: {canary: 2}\n")
    with pytest.raises(ConfigError, match="points at version 2, which was refused: "):
        serve(path)


def test_a_config_reload_moves_labels_or_keeps_the_old_config(roots, red_png):
    path = write_config(roots, CONFIG, "reload.yaml")
    app = serve(path)
    client, registry = app.test_client(), app.extensions["convnet.registry"]

    def canary() -> int:
        return client.post("/v1/models/alpha/labels/canary:predict",
                           json={"instances": [{"b64": b64(red_png)}]}).get_json()[
            "model_spec"]["version"]

    assert canary() == "2"
    assert not registry.poll_config()  # unchanged
    write_config(roots, CONFIG.replace("canary: 2", "canary: 1"), "reload.yaml")
    assert registry.poll_config() and canary() == "1"
    alpha = registry.served.holders["alpha"]

    # A label at a version the policy lists but that is not there: refused, old mapping kept.
    write_config(roots, CONFIG.replace("[1, 2]", "[1, 2, 3]").replace("canary: 2", "canary: 3"),
                 "reload.yaml")
    assert not registry.poll_config()
    assert re.match(re.escape(f"{path}:7: label 'canary' of model 'alpha' points at version 3, "
                              "which is not loaded"), registry.config_error)
    assert canary() == "1" and registry.served.holders["alpha"] is alpha
    assert client.get("/readyz").get_json()["config_error"] == registry.config_error

    write_config(roots, CONFIG + "  - name: [\n", "reload.yaml")  # a syntax error: kept too
    assert not registry.poll_config() and "YAML syntax" in registry.config_error
    assert canary() == "1"

    # Dropping a model: it answers 404 and its memory leaves /metrics.
    write_config(roots, CONFIG.split("  - name: beta")[0], "reload.yaml")
    assert registry.poll_config() and registry.config_error is None
    assert registry.served.holders["alpha"] is alpha  # same root and policy: kept as it was
    assert client.post("/api/v1/predict?model=beta", data=red_png,
                       content_type="image/png").status_code == 404
    assert 'model="beta"' not in client.get("/metrics").text


def test_the_config_file_is_polled(roots, red_png):
    path = write_config(roots, CONFIG, "polled.yaml")
    app = serve(path, RELOAD_INTERVAL=0.05)
    registry = app.extensions["convnet.registry"]
    try:
        write_config(roots, CONFIG.replace("canary: 2", "canary: 1"), "polled.yaml")
        deadline = time.monotonic() + 10
        while registry.served.labels("alpha")["canary"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert registry.served.labels("alpha") == {"stable": 1, "canary": 1}
    finally:
        registry.stop()


# --- hot reload per model, memory per version ---------------------------------------------------

def test_a_new_version_reloads_its_own_model_only(tmp_path, roots, red_png):
    write_version(tmp_path / "alpha", 1)
    path = write_config(tmp_path, f"models:\n  - name: alpha\n    base_path: alpha\n"
                                  f"  - name: beta\n    base_path: {roots / 'beta'}\n")
    app = serve(path)
    client, holders = app.test_client(), app.extensions["convnet.registry"].served.holders
    beta = holders["beta"].current

    write_version(tmp_path / "alpha", 2, weights=TINY_WEIGHTS[2])
    holders["alpha"].poll()
    holders["beta"].poll()
    holders["alpha"].poll()  # the second sight of alpha/2: its files have settled
    holders["beta"].poll()
    body = client.post("/api/v1/predict?model=alpha", data=red_png,
                       content_type="image/png").get_json()
    assert (body["version"], top_label(body)) == (2, "bird")
    assert holders["beta"].current is beta and list(holders["alpha"].loaded) == [2]

    text = client.get("/metrics").text
    memory = r'convnet_model_memory_bytes\{model="%s",precision="float",version="%d"\} (\S+)'
    assert float(re.search(memory % ("alpha", 2), text).group(1)) > 0
    assert float(re.search(memory % ("beta", 1), text).group(1)) > 0
    assert not re.search(memory % ("alpha", 1), text)  # replaced under the latest policy


def test_under_policy_all_a_new_version_joins_the_loaded_ones(tmp_path, red_png):
    write_version(tmp_path / "alpha", 1)
    path = write_config(tmp_path, "models:\n  - name: alpha\n    base_path: alpha\n"
                                  "    version_policy: all\n    labels: {stable: 1}\n")
    app = serve(path)
    client, holder = app.test_client(), app.extensions["convnet.registry"].served.holders["alpha"]
    write_version(tmp_path / "alpha", 2, weights=TINY_WEIGHTS[2])
    holder.poll()
    holder.poll()
    assert sorted(holder.loaded) == [1, 2]
    for query, version in (("", 2), ("&label=stable", 1), ("&version=1", 1)):
        body = client.post("/api/v1/predict?model=alpha" + query, data=red_png,
                           content_type="image/png").get_json()
        assert body["version"] == version
    assert len(re.findall(r'convnet_model_memory_bytes\{model="alpha"',
                          client.get("/metrics").text)) == 2


def test_metrics_report_each_loaded_version_of_each_model(client):
    text = client.get("/metrics").text
    found = re.findall(r'convnet_model_memory_bytes\{model="(\w+)",precision="float",'
                       r'version="(\d+)"\} (\S+)', text)
    assert sorted((m, v) for m, v, _ in found) == [("alpha", "1"), ("alpha", "2"), ("beta", "1")]
    assert all(float(size) > 0 for _, _, size in found)


# --- the page -----------------------------------------------------------------------------------

def test_the_page_offers_a_model_picker_inside_its_form(client):
    html = client.get("/").text
    form = re.search(r'<form id="upload-form".*?</form>', html, re.S).group(0)
    select = re.search(r'<select id="model-select" name="model">(.*?)</select>', form, re.S)
    assert select, "the picker must be a <select> in the form, submitted with it"
    assert re.findall(r'<option value="(\w+)"( selected)?>', select.group(1)) == [
        ("alpha", " selected"), ("beta", "")]
    assert 'id="model-name">alpha<' in html
    chosen = client.get("/?model=beta").text
    assert 'value="beta" selected' in chosen and 'id="model-name">beta<' in chosen
    assert client.get("/?model=gamma").status_code == 404


def test_the_form_without_javascript_asks_the_picked_model(client, red_png):
    page = client.post("/", data={"model": "beta", "file": (io.BytesIO(red_png), "r.png")},
                       content_type="multipart/form-data")
    assert page.status_code == 200
    assert 'class="top-label">red<' in page.text and 'id="model-name">beta<' in page.text
    page = client.post("/", data={"file": (io.BytesIO(red_png), "r.png")},
                       content_type="multipart/form-data")
    assert 'class="top-label">bird<' in page.text  # no choice: the default model


def test_a_single_model_page_has_no_picker(app):
    assert "model-select" not in app.test_client().get("/").text


def test_feedback_names_the_model_it_is_for(roots, tmp_path, red_png):
    client = serve(write_config(roots, CONFIG, "feedback.yaml"),
                   FEEDBACK_DB=str(tmp_path / "f.sqlite3")).test_client()
    saved = client.post("/api/v1/feedback?model=beta", data={
        "file": (io.BytesIO(red_png), "r.png"), "label": "green"},
        content_type="multipart/form-data")
    assert saved.status_code == 201, saved.get_json()
    assert saved.get_json()["model"] == "beta"
    # The page's result card: its feedback form names the model that answered, with its classes.
    page = client.post("/", data={"model": "beta", "file": (io.BytesIO(red_png), "r.png")},
                       content_type="multipart/form-data").text
    card = re.search(r'<form class="feedback".*?</form>', page, re.S).group(0)
    assert '<input type="hidden" name="model" value="beta">' in card
    image = re.search(r'name="image" value="([^"]+)"', card).group(1)
    saved = client.post("/feedback", data={"image": image, "predicted": "red", "model": "beta",
                                           "verdict": "wrong", "label": "blue"},
                        content_type="multipart/form-data")
    assert saved.status_code == 200 and "saved as &#39;blue&#39;" in saved.text


# --- the real server --------------------------------------------------------------------------

@pytest.mark.slow
def test_gunicorn_serves_two_models(live_server_factory, roots, red_png):
    path = write_config(roots, CONFIG, "live.yaml")
    server = live_server_factory(None, model_config=path, workers=2, threads=2)
    status, headers, body = http("POST", server.url + "/api/v1/predict?model=beta", red_png,
                                 {"Content-Type": "image/png"})
    assert status == 200 and top_label(json.loads(body)) == "red"
    assert headers["X-Model-Name"] == "beta"
    status, _, body = http("POST", server.url + "/v1/models/alpha/labels/stable:predict",
                           json.dumps({"instances": [{"b64": b64(red_png)}]}).encode())
    assert status == 200 and json.loads(body)["model_spec"]["version"] == "1"
    status, _, body = http("GET", server.url + "/v1/models/gamma")
    assert status == 404 and json.loads(body)["models"] == ["alpha", "beta"]
    text = http("GET", server.url + "/metrics")[2].decode()
    for model, version in (("alpha", 1), ("alpha", 2), ("beta", 1)):
        assert re.search(f'convnet_model_memory_bytes{{model="{model}",pid="\\d+",'
                         f'precision="float",version="{version}"}}', text), (model, version)
    out, err = server.stop()
    assert server.process.returncode == 0, err[-3000:]
    assert f"serving alpha, beta (from {path.resolve()}) at {server.url}/" in out


@pytest.mark.slow
def test_gunicorn_refuses_to_start_with_a_label_at_a_refused_version(tmp_path):
    write_version(tmp_path / "alpha", 1)
    write_version(tmp_path / "alpha", 2, onnx_bytes=b"not an onnx model")
    path = write_config(tmp_path, "models:\n  - name: alpha\n    base_path: alpha\n"
                                  "    version_policy: all\n    labels: {canary: 2}\n")
    code = f"from convnet.serve.server import run; run(model_config={str(path)!r}, port=0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert f"convnet: {path}:5: label 'canary' of model 'alpha' points at version 2, which " \
           "was refused" in done.stderr
    assert "Traceback" not in done.stderr
