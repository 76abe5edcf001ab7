"""POST /api/v1/feedback and the page's feedback form: stored when right, a 4xx saying why when
the client is wrong, 503 + Retry-After when the database is, and predictions answer throughout."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import CIFAR10_LABELS, free_port, http, image_bytes

from convnet.feedback import store as store_module
from convnet.feedback.store import FeedbackStore
from convnet.serve import create_app


@pytest.fixture
def db(tmp_path):
    return tmp_path / "feedback.sqlite3"


@pytest.fixture
def fb_app(model_root, db):
    return create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0,
                       "FEEDBACK_DB": str(db), "FEEDBACK_MAX_ITEMS": 3,
                       "FEEDBACK_MAX_IMAGE_BYTES": 4096})


@pytest.fixture
def fb_client(fb_app):
    return fb_app.test_client()


def stored(db) -> list[tuple]:
    if not db.exists():
        return []
    return sqlite3.connect(db).execute("SELECT label, predicted, source FROM feedback").fetchall()


def post_file(client, data: bytes = b"", **fields):
    return client.post("/api/v1/feedback", content_type="multipart/form-data",
                       data={"file": (io.BytesIO(data or image_bytes()), "../../etc/x.png"),
                             **fields})


def test_multipart_feedback_is_stored_and_answered_after_commit(fb_client, db):
    answer = post_file(fb_client, label="cat", predicted="airplane", note=" furry ")
    assert answer.status_code == 201
    assert answer.get_json() == {"id": 1, "label": "cat", "predicted": "airplane",
                                 "correct": False, "model": "cifar10", "version": 1}
    assert stored(db) == [("cat", "airplane", "api")]


def test_json_feedback_is_stored(fb_client, db):
    b64 = base64.b64encode(image_bytes((0, 255, 0))).decode()
    answer = fb_client.post("/api/v1/feedback", json={"b64": b64, "label": "automobile",
                                                      "predicted": "automobile"})
    assert answer.status_code == 201 and answer.get_json()["correct"] is True
    assert stored(db) == [("automobile", "automobile", "api")]


BAD_REQUESTS = [
    ("an unknown label", dict(label="kat"), 400, "not one of the model's classes: airplane"),
    ("no label", dict(), 400, "'label' is missing"),
    ("an unknown predicted", dict(label="cat", predicted="x"), 400, "predicted 'x' is not"),
    ("a long note", dict(label="cat", note="n" * 1001), 400, "the limit is 1000"),
    ("not an image", dict(label="cat", data=b"hello"), 400, "image"),
    ("an oversized image", dict(label="cat", data=b"\x89PNG" + bytes(5000)), 413,
     "limit for feedback is 4096"),
    ("a decompression bomb", dict(label="cat", data=image_bytes(size=(9000, 9000))), 413,
     "pixels"),
]


@pytest.mark.parametrize(("what", "fields", "status", "message"), BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_multipart_feedback_gets_a_4xx_and_stores_nothing(fb_app, fb_client, db, what,
                                                               fields, status, message):
    if what == "a decompression bomb":
        fb_app.config["FEEDBACK_MAX_IMAGE_BYTES"] = 10**7
    answer = post_file(fb_client, fields.pop("data", b""), **fields)
    assert answer.status_code == status, answer.get_json()
    assert message in answer.get_json()["error"]
    assert stored(db) == []


@pytest.mark.parametrize(("body", "content_type", "status", "message"), [
    (b'{"b64": ', "application/json", 400, "malformed JSON"),
    (b'[1, 2]', "application/json", 400, "must be an object"),
    (b'{"label": "cat"}', "application/json", 400, "expected {\"b64\""),
    (b'{"b64": "!!", "label": "cat"}', "application/json", 400, "invalid base64"),
    (b'{"b64": "aGk=", "label": ["cat"]}', "application/json", 400, "label must be a string"),
    (b"label=cat", "application/x-www-form-urlencoded", 415, "unsupported content type"),
])
def test_bad_feedback_bodies_get_a_4xx(fb_client, db, body, content_type, status, message):
    answer = fb_client.post("/api/v1/feedback", data=body, content_type=content_type)
    assert answer.status_code == status and message in answer.get_json()["error"]
    assert stored(db) == []


def test_two_images_in_one_feedback_are_refused(fb_client, db):
    answer = fb_client.post("/api/v1/feedback", content_type="multipart/form-data", data={
        "file": [(io.BytesIO(image_bytes()), "a.png"), (io.BytesIO(image_bytes()), "b.png")],
        "label": "cat"})
    assert answer.status_code == 400 and "exactly one image" in answer.get_json()["error"]


def test_a_full_store_answers_507(fb_client, db):
    for _ in range(3):
        assert post_file(fb_client, label="cat").status_code == 201
    answer = post_file(fb_client, label="dog")
    assert answer.status_code == 507 and "full (3 items)" in answer.get_json()["error"]
    assert len(stored(db)) == 3


def test_a_locked_database_answers_503_and_predictions_still_answer(fb_client, db,
                                                                   monkeypatch):
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.2)
    assert post_file(fb_client, label="cat").status_code == 201
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        answer = post_file(fb_client, label="dog")
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
        assert "nothing was stored" in answer.get_json()["error"]
        assert str(db) not in answer.get_data(as_text=True)
        predict = fb_client.post("/api/v1/predict", data=image_bytes(), content_type="image/png")
        assert predict.status_code == 200
    finally:
        lock.execute("ROLLBACK")
    assert stored(db) == [("cat", None, "api")]
    assert post_file(fb_client, label="dog").status_code == 201  # and it recovers


def test_an_unreachable_database_answers_503_and_predictions_still_answer(model_root):
    client = create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0, "FEEDBACK_DB":
                         f"postgresql://u:secret@127.0.0.1:{free_port()}/x"}).test_client()
    answer = post_file(client, label="cat")
    assert answer.status_code == 503 and "Retry-After" in answer.headers
    assert "secret" not in answer.get_data(as_text=True)
    assert client.post("/api/v1/predict", data=image_bytes(),
                       content_type="image/png").status_code == 200


def test_feedback_turned_off_is_a_404_and_the_page_offers_no_form(model_root):
    client = create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0,
                         "FEEDBACK_DB": ""}).test_client()
    assert post_file(client, label="cat").status_code == 404
    page = client.post("/", data={"file": (io.BytesIO(image_bytes()), "a.png")})
    assert 'class="feedback"' not in page.get_data(as_text=True)


def page_feedback(client, html: str, **fields):
    """Submit the first result's feedback form as a browser would (multipart)."""
    form = re.search(r'<form class="feedback".*?</form>', html, re.S).group(0)
    hidden = dict(re.findall(r'type="hidden" name="(\w+)" value="([^"]*)"', form))
    return client.post("/feedback", content_type="multipart/form-data", data={**hidden, **fields})


def test_the_page_without_javascript_takes_right_and_wrong(fb_client, db):
    page = fb_client.post("/", data={"file": (io.BytesIO(image_bytes()), "red.png")})
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and html.count("<option") == len(CIFAR10_LABELS)
    right = page_feedback(fb_client, html, verdict="right", label="truck")
    assert right.status_code == 200 and "saved as &#39;airplane&#39;" in right.text
    wrong = page_feedback(fb_client, html, verdict="wrong", label="bird")
    assert "saved as &#39;bird&#39;" in wrong.text
    assert stored(db) == [("airplane", "airplane", "page"), ("bird", "airplane", "page")]
    bad = page_feedback(fb_client, html, verdict="wrong", label="zebra")
    assert bad.status_code == 400 and "not one of the model" in bad.text
    assert len(stored(db)) == 2


def test_metrics_count_feedback_received_and_stored(fb_client):
    post_file(fb_client, label="cat")
    post_file(fb_client, label="kat")
    text = fb_client.get("/metrics").get_data(as_text=True)
    assert 'convnet_feedback_received_total{source="api"} 2.0' in text
    assert 'convnet_feedback_stored_total{source="api"} 1.0' in text


def test_openapi_documents_the_feedback_request_and_answer(fb_client):
    spec = fb_client.get("/openapi.json").get_json()
    post = spec["paths"]["/api/v1/feedback"]["post"]
    multipart = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert multipart["required"] == ["label"]
    assert {"file", "prediction_id", "predicted", "note"} <= set(multipart["properties"])
    predict = spec["paths"]["/api/v1/predict"]["post"]
    assert "keep" in [p["name"] for p in predict["parameters"]]
    assert {"201", "400", "413", "503", "507"} <= set(post["responses"])
    assert "correct" in spec["components"]["schemas"]["FeedbackResponse"]["properties"]


@pytest.mark.slow
def test_gunicorn_workers_share_the_store_and_keep_acknowledged_writes_after_kill_9(
        live_server_factory, model_root, tmp_path):
    db = tmp_path / "shared.sqlite3"
    server = live_server_factory(model_root, workers=2, threads=4,
                                 config={"FEEDBACK_DB": str(db), "RELOAD_INTERVAL": 0})
    body = json.dumps({"b64": base64.b64encode(image_bytes()).decode(), "label": "cat"}).encode()

    def send(_):
        return http("POST", server.url + "/api/v1/feedback", body,
                    {"Content-Type": "application/json"}, timeout=60)[0]

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(send, range(24)))
    # On a loaded machine a writer may wait out the lock timeout: 503, and nothing stored.
    acknowledged = statuses.count(201)
    assert set(statuses) <= {201, 503} and acknowledged >= 12, statuses
    metrics = http("GET", server.url + "/metrics", timeout=60)[2].decode()
    assert f'convnet_feedback_stored_total{{source="api"}} {acknowledged}.0' in metrics
    master = server.process.pid  # SIGKILL the master and its workers: no clean shutdown
    workers = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    for pid in [master, *map(int, workers)]:
        os.kill(pid, signal.SIGKILL)
    server.process.wait(timeout=10)
    assert FeedbackStore(str(db), max_items=100).count() == acknowledged


def predict_kept(client, *colours):
    return client.post("/api/v1/predict?keep=1", content_type="multipart/form-data", data={
        "file": [(io.BytesIO(image_bytes(c)), f"{k}.png") for k, c in enumerate(colours)]})


def test_feedback_names_a_prediction_kept_by_predict_keep_1(fb_client, db):
    answer = predict_kept(fb_client, (255, 0, 0), (0, 0, 255))
    assert answer.status_code == 200 and answer.get_json()["kept"] is True
    red, blue = answer.get_json()["predictions"]
    assert red["label"] == "airplane" and len(red["prediction_id"]) == 32
    stored_answer = fb_client.post("/api/v1/feedback", json={
        "prediction_id": blue["prediction_id"], "label": "ship", "note": "a sea"})
    assert stored_answer.status_code == 201
    assert stored_answer.get_json() | {"id": 0} == {
        "id": 0, "label": "ship", "predicted": "bird", "correct": False, "model": "cifar10",
        "version": 1}
    again = fb_client.post("/api/v1/feedback", json={"prediction_id": blue["prediction_id"],
                                                     "label": "ship"})
    assert again.status_code == 404 and "unknown prediction_id" in again.get_json()["error"]
    by_form = fb_client.post("/api/v1/feedback", content_type="multipart/form-data",
                             data={"prediction_id": red["prediction_id"], "label": "airplane"})
    assert by_form.status_code == 201 and by_form.get_json()["correct"] is True
    assert stored(db) == [("ship", "bird", "api"), ("airplane", "airplane", "api")]
    assert sqlite3.connect(db).execute("SELECT count(*) FROM kept_images").fetchone() == (0,)


def test_predictions_are_not_kept_unless_asked(fb_client, db):
    answer = fb_client.post("/api/v1/predict", data=image_bytes(), content_type="image/png")
    assert "prediction_id" not in answer.get_json()["predictions"][0] and not db.exists()


def test_kept_images_expire_and_are_bounded(model_root, db):
    client = create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0,
                         "FEEDBACK_DB": str(db), "FEEDBACK_KEEP_SECONDS": 0,
                         "FEEDBACK_MAX_KEPT": 2}).test_client()
    first = predict_kept(client, (255, 0, 0)).get_json()["predictions"][0]["prediction_id"]
    late = client.post("/api/v1/feedback", json={"prediction_id": first, "label": "cat"})
    assert late.status_code == 404 and "older than 0 s" in late.get_json()["error"]
    crowded = predict_kept(client, *[(255, 0, 0)] * 3)
    assert crowded.status_code == 200 and crowded.get_json()["kept"] is False
    assert "the limit is 2" in crowded.get_json()["kept_error"]


def test_predictions_answer_when_the_images_cannot_be_kept(model_root):
    client = create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0, "FEEDBACK_DB":
                         f"postgresql://u@127.0.0.1:{free_port()}/x"}).test_client()
    answer = predict_kept(client, (255, 0, 0))
    assert answer.status_code == 200 and answer.get_json()["kept"] is False
    assert "unavailable" in answer.get_json()["kept_error"]
    assert answer.get_json()["predictions"][0]["label"] == "airplane"


@pytest.mark.parametrize(("body", "message"), [
    ({"b64": "aGk=", "prediction_id": "x", "label": "cat"}, "or {\"prediction_id\""),
    ({"prediction_id": "0" * 32, "label": "kat"}, "not one of the model's classes"),
    ({"prediction_id": 7, "label": "cat"}, "prediction_id must be a string"),
])
def test_bad_references_get_a_400(fb_client, body, message):
    answer = fb_client.post("/api/v1/feedback", json=body)
    assert answer.status_code == 400 and message in answer.get_json()["error"]


def test_keep_must_be_a_boolean(fb_client):
    answer = fb_client.post("/api/v1/predict?keep=maybe", data=image_bytes(),
                            content_type="image/png")
    assert answer.status_code == 400 and "keep must be 1 or 0" in answer.get_json()["error"]


def test_serve_passes_feedback_db_to_the_app(monkeypatch):
    from click.testing import CliRunner

    from convnet import cli
    from convnet.serve import server

    seen = {}
    monkeypatch.setattr(server, "run", lambda **kwargs: seen.update(kwargs))
    result = CliRunner().invoke(cli.main, ["serve", "--feedback-db", "postgresql://h/db"])
    assert result.exit_code == 0, result.output
    assert seen["config"] == {"FEEDBACK_DB": "postgresql://h/db"}


def test_a_locked_database_on_the_page_is_a_503_page_with_retry_after(fb_client, db,
                                                                     monkeypatch):
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.2)
    html = fb_client.post("/", data={"file": (io.BytesIO(image_bytes()), "a.png")}).text
    post_file(fb_client, label="cat")  # creates the file
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        answer = page_feedback(fb_client, html, verdict="right")
    finally:
        lock.execute("ROLLBACK")
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    assert "nothing was stored" in answer.text and len(stored(db)) == 1


def test_a_feedback_body_of_many_parts_is_refused(fb_client, db):
    data = {"label": "cat", "file": (io.BytesIO(image_bytes()), "a.png"),
            **{f"extra{k}": "x" for k in range(40)}}
    answer = fb_client.post("/api/v1/feedback", content_type="multipart/form-data", data=data)
    assert answer.status_code == 400 and "at most 16 parts" in answer.get_json()["error"]
    assert stored(db) == []


@pytest.mark.parametrize(("setting", "message"), [
    ("mysql://h/db", "not a mysql URL"),
])
def test_a_database_we_cannot_use_is_refused_at_start(model_root, setting, message):
    with pytest.raises(ValueError, match=message):
        create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0, "FEEDBACK_DB": setting})
