"""Access logs and request ids (convnet.serve.accesslog)."""

from __future__ import annotations

import base64
import json
import os
import re

import pytest

from convnet.keys import create_key
from convnet.serve import create_app

PREDICT = "/api/v1/predict"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
FIELDS = {"time", "request_id", "method", "path", "route", "status", "latency_ms", "model",
          "version", "images", "key", "remote_addr", "bytes_in", "worker"}


def logged_app(model_root, log_target, **config):
    return create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0, "TESTING": True,
                       "ACCESS_LOG": str(log_target), **config})


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def multipart(*images: bytes) -> dict:
    import io

    return {"file": [(io.BytesIO(data), f"{i}.png") for i, data in enumerate(images)]}


def test_one_json_line_per_request(model_root, tmp_path, red_png, green_jpeg):
    log = tmp_path / "access.jsonl"
    client = logged_app(model_root, log).test_client()
    ok = client.post(PREDICT + "?top_k=2", data=multipart(red_png, green_jpeg),
                     content_type="multipart/form-data")
    bad = client.post(PREDICT, data=b"not an image", content_type="image/png")
    big = client.post(PREDICT, data=b"x" * (11 * 1024 * 1024), content_type="image/png")
    client.get("/healthz")
    assert [ok.status_code, bad.status_code, big.status_code] == [200, 400, 413]

    entries = lines(log)
    assert [e["status"] for e in entries] == [200, 400, 413, 200]
    first = entries[0]
    assert set(first) == FIELDS
    assert first["request_id"] == ok.headers["X-Request-Id"]
    assert (first["method"], first["path"], first["route"]) == ("POST", PREDICT, PREDICT)
    assert (first["model"], first["version"], first["images"]) == ("cifar10", 1, 2)
    assert first["key"] is None and first["remote_addr"] == "127.0.0.1"
    assert isinstance(first["latency_ms"], float) and first["latency_ms"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert entries[1]["images"] == 0 and entries[1]["model"] == "cifar10"  # failed to decode
    assert entries[2]["bytes_in"] == 11 * 1024 * 1024 and entries[2]["model"] is None
    assert entries[3]["route"] == "/healthz" and entries[3]["bytes_in"] is None


def test_the_log_names_the_key_never_the_key_or_the_images(model_root, tmp_path, red_png):
    log, keys = tmp_path / "access.jsonl", tmp_path / "keys.json"
    key = create_key(keys, "ci-bot")[0]
    client = logged_app(model_root, log, API_KEYS_FILE=str(keys)).test_client()
    b64 = base64.b64encode(red_png).decode()
    assert client.post(PREDICT, json={"instances": [{"b64": b64}]},
                       headers={"X-API-Key": key}).status_code == 200
    assert client.post(PREDICT, json={"instances": [{"b64": b64}]},
                       headers={"Authorization": f"Bearer {key}x"}).status_code == 401
    text = log.read_text()
    assert key not in text and b64[:40] not in text and "ci-bot" in text
    assert [e["key"] for e in lines(log)] == ["ci-bot", None]


def test_feedback_lines_name_the_model_that_checked_the_label(model_root, tmp_path, red_png):
    """Feedback runs no model (images 0), but the served one checks its label: that is logged."""
    log = tmp_path / "access.jsonl"
    client = logged_app(model_root, log, FEEDBACK_DB=str(tmp_path / "fb.sqlite3")).test_client()
    b64 = base64.b64encode(red_png).decode()
    answers = [
        client.post("/api/v1/feedback", json={"b64": b64, "label": "cat"}),
        client.post("/api/v1/feedback", json={"b64": b64, "label": "not a class"}),
        client.post("/feedback", content_type="multipart/form-data", data={
            "image": "data:image/png;base64," + b64, "predicted": "airplane", "verdict": "right"}),
    ]
    assert [a.status_code for a in answers] == [201, 400, 200]
    assert [(e["route"], e["status"], e["model"], e["version"], e["images"])
            for e in lines(log)] == [("/api/v1/feedback", 201, "cifar10", 1, 0),
                                     ("/api/v1/feedback", 400, "cifar10", 1, 0),
                                     ("/feedback", 200, "cifar10", 1, 0)]


@pytest.mark.parametrize("supplied,kept", [
    ("abc-123", True),
    ("3f2a9c1e-7d4b-4e8a-9c2f-1b3d5e7f9a0b", True),
    ("trace:span/1+x=@.", True),
    ("x" * 128, True),
    ("x" * 129, False),
    ("", False),
    ("has space", False),
    ('quote"s', False),
    ("new\\nline", False),
    ("caf\u00e9", False),
])
def test_request_id_is_the_clients_when_sane(model_root, tmp_path, supplied, kept):
    log = tmp_path / "access.jsonl"
    client = logged_app(model_root, log).test_client()
    answered = client.get("/healthz", headers={"X-Request-Id": supplied})
    echoed = answered.headers["X-Request-Id"]
    if kept:
        assert echoed == supplied
    else:
        assert GENERATED_ID.fullmatch(echoed)
    assert lines(log)[0]["request_id"] == echoed


def test_every_answer_has_a_fresh_request_id(model_root, tmp_path, red_png):
    client = logged_app(model_root, "").test_client()
    ids = {client.get("/healthz").headers["X-Request-Id"] for _ in range(5)}
    ids.add(client.post(PREDICT, data=b"", content_type="text/plain").headers["X-Request-Id"])
    ids.add(client.get("/no/such/route").headers["X-Request-Id"])
    assert len(ids) == 7 and all(GENERATED_ID.fullmatch(i) for i in ids)


def test_a_forked_process_makes_ids_of_its_own():
    # gunicorn forks its workers from one master: a copied generator would repeat the ids
    from convnet.serve.accesslog import _new_id

    _new_id()  # the parent's generator exists before the fork
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child process)
        os.write(writer, _new_id().encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    with os.fdopen(reader, "rb") as pipe:
        theirs = pipe.read().decode()
    assert GENERATED_ID.fullmatch(theirs) and theirs != _new_id()


def test_stderr_by_default_and_off_when_empty(model_root, capsys):
    default = create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0})
    assert default.config["ACCESS_LOG"] == "-"
    capsys.readouterr()
    default.test_client().get("/healthz")
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines()
              if line.startswith("{")]
    assert [e["path"] for e in logged] == ["/healthz"]

    logged_app(model_root, "").test_client().get("/healthz")
    assert '"path"' not in capsys.readouterr().err


def test_workers_may_share_one_file(model_root, tmp_path):
    log = tmp_path / "shared.jsonl"
    clients = [logged_app(model_root, log).test_client() for _ in range(2)]
    for i in range(20):
        clients[i % 2].get(f"/healthz?n={i}")
    assert len(lines(log)) == 20  # whole lines, none lost
