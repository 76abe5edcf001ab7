"""API keys (convnet.keys, convnet.serve.auth, `convnet keys`) and rate limits
(convnet.serve.ratelimit), in process and across two real gunicorn workers."""

from __future__ import annotations

import base64
import hmac
import io
import json
import os
import re
import stat
import threading
import time

import pytest
from click.testing import CliRunner
from conftest import http, image_bytes

from convnet.cli import main
from convnet.keys import KeysFileError, create_key, hash_key, read_keys, revoke_key
from convnet.serve import auth as auth_module
from convnet.serve import create_app
from convnet.serve.auth import EXEMPT_ENDPOINTS
from convnet.serve.ratelimit import SQLiteStorage

PREDICT = "/api/v1/predict"
EXEMPT_PATHS = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/static/app.js",
                "/v2/health/live", "/v2/health/ready"]
CHALLENGE = 'Bearer realm="convnet"'


@pytest.fixture
def keys_file(tmp_path):
    return tmp_path / "keys.json"


@pytest.fixture
def alice(keys_file) -> str:
    return create_key(keys_file, "alice")[0]


def keyed_app(model_root, keys_file, **config):
    return create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0, "TESTING": True,
                       "API_KEYS_FILE": str(keys_file), "ACCESS_LOG": "", **config})


@pytest.fixture
def client(model_root, keys_file, alice):
    return keyed_app(model_root, keys_file).test_client()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def predict(client, red_png, headers=None):
    return client.post(PREDICT, data=red_png, content_type="image/png", headers=headers or {})


def assert_401(response, error: str | None = None):
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith(CHALLENGE)
    if error:
        assert f'error="{error}"' in response.headers["WWW-Authenticate"]
    assert isinstance(response.get_json()["error"], str)


# --- the keys file and `convnet keys` -------------------------------------------------------


def test_keys_commands_create_list_revoke(keys_file):
    runner = CliRunner()
    created = runner.invoke(main, ["keys", "create", "--file", str(keys_file), "--name", "ci",
                                   "--rate-limit", "10/minute"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert re.fullmatch(r"cnk_[A-Za-z0-9_-]{43}", key)  # 256 random bits
    assert stat.S_IMODE(os.stat(keys_file).st_mode) == 0o600
    text = keys_file.read_text()
    assert key not in text and hash_key(key) in text  # only the hash is stored
    assert runner.invoke(main, ["keys", "create", "--file", str(keys_file)]).exit_code == 0

    listed = runner.invoke(main, ["keys", "list", "--file", str(keys_file)])
    assert listed.exit_code == 0 and key not in listed.output
    assert [line.split("\t")[0] for line in listed.output.splitlines()] == ["ci", "key-1"]
    assert "10/minute" in listed.output

    again = runner.invoke(main, ["keys", "create", "--file", str(keys_file), "--name", "ci"])
    assert again.exit_code == 2 and "already has a key named 'ci'" in again.output
    assert runner.invoke(main, ["keys", "revoke", "--file", str(keys_file), "ci"]).exit_code == 0
    assert [r.name for r in read_keys(keys_file)] == ["key-1"]
    gone = runner.invoke(main, ["keys", "revoke", "--file", str(keys_file), "ci"])
    assert gone.exit_code == 2 and "no key named 'ci'" in gone.output
    assert sorted(p.name for p in keys_file.parent.iterdir()) == ["keys.json", "keys.json.lock"]


@pytest.mark.parametrize("name,limit", [("bad name", None), ("-x", None), ("a" * 65, None),
                                        ("ok", "lots")])
def test_keys_create_refuses_bad_names_and_limits(keys_file, name, limit):
    with pytest.raises(KeysFileError):
        create_key(keys_file, name, limit)
    assert not keys_file.exists()


def test_concurrent_creates_lose_no_key(keys_file):
    threads = [threading.Thread(target=create_key, args=(keys_file, f"k{i}")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.name for r in read_keys(keys_file)) == [f"k{i}" for i in range(8)]


# --- who gets in ------------------------------------------------------------------------------


def test_keys_are_off_by_default(app, red_png):
    assert predict(app.test_client(), red_png).status_code == 200


def _doors(app):
    """(method, path) of every route that is not exempt, with sample path arguments."""
    values = {"name": "cifar10", "version": "1", "label": "stable", "filename": "app.js"}
    for rule in app.url_map.iter_rules():
        if rule.endpoint in EXEMPT_ENDPOINTS:
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: values[m.group(1)], rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield method, path


def test_every_door_needs_the_key(client, alice, red_png):
    doors = list(_doors(client.application))
    assert ("POST", PREDICT) in doors and ("GET", "/") in doors and len(doors) > 20
    for method, path in doors:
        response = client.open(path, method=method, data=red_png, content_type="image/png")
        assert_401(response)
        # With the key the same request gets past the door (whatever the route makes of it).
        answered = client.open(path, method=method, data=red_png, content_type="image/png",
                               headers=bearer(alice))
        assert answered.status_code != 401, (method, path)
    assert_401(client.get("/no/such/route"))  # unknown routes too: they say nothing unasked


@pytest.mark.parametrize("path", EXEMPT_PATHS)
def test_exempt_routes_answer_without_a_key(client, path):
    assert client.get(path).status_code == 200


def test_cors_preflight_needs_no_key(model_root, keys_file, alice):
    client = keyed_app(model_root, keys_file, CORS_ORIGINS=["https://a.example"]).test_client()
    response = client.options(PREDICT, headers={"Origin": "https://a.example",
                                                "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "X-API-Key"})
    assert response.status_code == 200
    assert "X-API-Key" in response.headers["Access-Control-Allow-Headers"]


def test_good_keys_in_every_form(client, alice, red_png):
    basic = base64.b64encode(f"anyone:{alice}".encode()).decode()
    for headers in (bearer(alice), {"Authorization": f"bearer   {alice} "},
                    {"X-API-Key": alice}, {"Authorization": f"Basic {basic}"}):
        response = predict(client, red_png, headers)
        assert response.status_code == 200, headers
        assert response.get_json()["predictions"][0]["label"] == "airplane"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize("headers,error", [
    ({}, None),
    ({"Authorization": "Bearer cnk_wrong"}, "invalid_token"),
    ({"X-API-Key": "cnk_wrong"}, "invalid_token"),
    ({"Authorization": "Bearer"}, "invalid_request"),
    ({"Authorization": "Bearer "}, "invalid_request"),
    ({"Authorization": ""}, "invalid_request"),
    ({"Authorization": "Token abc"}, "invalid_request"),
    ({"Authorization": "Basic !!!not base64"}, "invalid_request"),
    ({"Authorization": "Basic " + _b64("no colon")}, "invalid_request"),
    ({"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()}, "invalid_request"),
    ({"Authorization": "Bearer " + "k" * 300}, "invalid_request"),
    ({"Authorization": "Bearer caf\u00e9"}, "invalid_request"),
    ({"X-API-Key": ""}, "invalid_request"),
    ({"X-API-Key": "a\tb"}, "invalid_request"),
])
def test_missing_wrong_or_malformed_keys_get_401(client, red_png, headers, error):
    assert_401(predict(client, red_png, headers), error)


def test_the_page_offers_basic_auth_and_shows_nothing(client):
    response = client.get("/")
    assert_401(response)
    basic = response.headers.getlist("WWW-Authenticate")[1]
    assert basic == 'Basic realm="convnet", charset="UTF-8"'
    assert b"cifar10" not in response.data  # no model card for strangers
    assert client.post(PREDICT).headers.getlist("WWW-Authenticate") == [CHALLENGE]


def test_keys_are_compared_in_constant_time(client, keys_file, alice, red_png, monkeypatch):
    create_key(keys_file, "bob")
    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    assert predict(client, red_png, bearer(alice)).status_code == 200
    # Every key's hash compared against the presented one's, the match first in the file.
    assert calls == [(r.sha256, hash_key(alice)) for r in read_keys(keys_file)]


def test_keys_file_changes_apply_without_restart(client, keys_file, alice, red_png, caplog):
    bob = create_key(keys_file, "bob")[0]
    assert predict(client, red_png, bearer(bob)).status_code == 200
    revoke_key(keys_file, "alice")
    assert_401(predict(client, red_png, bearer(alice)), "invalid_token")

    keys_file.write_text("{not json")  # broken by hand: the keys read before stay in force
    assert predict(client, red_png, bearer(bob)).status_code == 200
    assert "not JSON" in caplog.text
    keys_file.unlink()  # gone: still never open to all
    assert_401(predict(client, red_png))
    assert predict(client, red_png, bearer(bob)).status_code == 200


def test_an_unreadable_keys_file_stops_the_start(model_root, tmp_path, monkeypatch):
    with pytest.raises(KeysFileError, match="cannot read"):
        keyed_app(model_root, tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"keys": 3}')
    with pytest.raises(KeysFileError, match="must hold"):
        keyed_app(model_root, tmp_path / "bad.json")
    from convnet.serve import server

    def started(self):
        raise AssertionError("gunicorn started")

    monkeypatch.setattr(server._GunicornApp, "run", started)
    with pytest.raises(KeysFileError):  # before gunicorn starts: the CLI prints one line
        server.run(model_root, config={"API_KEYS_FILE": str(tmp_path / "missing.json")})
    with pytest.raises(KeysFileError):
        server.run(model_root, config={"RATE_LIMIT": "lots"})


def test_a_refused_body_is_read_before_the_401(client, red_png):
    """A client still sending when the answer comes would see a reset, not the 401."""
    body = io.BytesIO(red_png + b"\0" * (2 * 1024 * 1024))
    size = len(body.getvalue())
    assert_401(client.post(PREDICT, input_stream=body, content_length=size,
                           content_type="image/png"))
    assert body.tell() == size  # all of it read (and dropped)


# --- rate limits ------------------------------------------------------------------------------


def test_rate_limit_per_key_with_429_and_retry_after(model_root, keys_file, alice, red_png):
    bob = create_key(keys_file, "bob", "1/hour")[0]  # a key's own limit beats RATE_LIMIT
    client = keyed_app(model_root, keys_file, RATE_LIMIT="3/hour").test_client()
    answers = [predict(client, red_png, bearer(alice)) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["2", "1", "0", "0"]
    refused = answers[-1]
    assert 3590 <= int(refused.headers["Retry-After"]) <= 3600
    assert "Retry-After" not in answers[0].headers
    assert refused.get_json()["error"] == "too many requests: API key 'alice' may make 3/hour"
    # The budget is the key's across doors, page included; other keys have their own.
    assert client.get("/", headers=bearer(alice)).status_code == 429
    assert predict(client, red_png, bearer(bob)).status_code == 200
    assert predict(client, red_png, bearer(bob)).status_code == 429
    for path in EXEMPT_PATHS:  # never counted, never refused
        assert client.get(path, headers=bearer(alice)).status_code == 200


def test_a_bad_rate_limit_stops_the_start(model_root):
    with pytest.raises(KeysFileError, match="rate limit 'lots'"):
        create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0, "RATE_LIMIT": "lots"})


def test_rate_limit_by_address_without_keys(model_root, red_png):
    client = create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0, "ACCESS_LOG": "",
                         "RATE_LIMIT": "1/hour"}).test_client()
    assert predict(client, red_png).status_code == 200
    refused = predict(client, red_png)
    assert refused.status_code == 429 and "client 127.0.0.1" in refused.get_json()["error"]


def test_sqlite_counters_are_shared_and_expire(tmp_path, monkeypatch):
    uri = f"sqlite://{tmp_path}/limits.sqlite3"
    first, second = SQLiteStorage(uri), SQLiteStorage(uri)  # as two workers would
    assert [first.incr("k", 60), second.incr("k", 60), first.incr("k", 60)] == [1, 2, 3]
    assert second.get("k") == 3 and second.get("other") == 0
    now = time.time()
    assert now + 55 < first.get_expiry("k") <= now + 60
    monkeypatch.setattr("convnet.serve.ratelimit.time.time", lambda: now + 61)
    assert second.get("k") == 0 and second.incr("k", 60) == 1  # a new window
    assert first.check()
    second.clear("k")
    assert first.get("k") == 0


@pytest.mark.slow
def test_rate_limit_holds_across_two_gunicorn_workers(live_server_factory, model_root, keys_file,
                                                      alice, red_png, tmp_path):
    limit, access_log = 6, tmp_path / "access.jsonl"
    server = live_server_factory(model_root, workers=2, threads=4, config={
        "API_KEYS_FILE": str(keys_file), "RATE_LIMIT": f"{limit}/hour",
        "ACCESS_LOG": str(access_log), "RELOAD_INTERVAL": 0})
    statuses: list[int] = []
    retry_after: list[str] = []

    def send(count: int) -> None:
        for _ in range(count):  # a new connection each: both workers take some
            status, headers, _ = http("POST", server.url + PREDICT, red_png,
                                      {"Content-Type": "image/png", **bearer(alice)})
            statuses.append(status)
            if status == 429:
                retry_after.append(headers["Retry-After"])

    def workers_seen() -> set[int]:
        lines = [json.loads(line) for line in access_log.read_text().splitlines()]
        return {e["worker"] for e in lines if e["key"] == "alice"}

    for _ in range(6):  # rounds of concurrent requests until both workers have answered
        threads = [threading.Thread(target=send, args=(3,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(workers_seen()) == 2:
            break
    assert len(workers_seen()) == 2, "one worker answered everything"
    assert statuses.count(200) == limit, statuses
    assert statuses.count(429) == len(statuses) - limit
    assert all(1 <= int(seconds) <= 3600 for seconds in retry_after)

    # Over real HTTP, a refused upload is answered, not reset, and nothing of it is logged.
    status, headers, body = http("POST", server.url + PREDICT, b"\0" * (4 * 1024 * 1024),
                                 {"Content-Type": "image/png"})
    assert status == 401 and headers["WWW-Authenticate"] == CHALLENGE
    assert json.loads(body)["error"].startswith("this server needs an API key")
    server.stop()
    assert alice not in access_log.read_text()


@pytest.mark.slow
def test_a_browser_uses_the_page_with_a_key(live_server_factory, model_root, keys_file, alice,
                                            tmp_path):
    """The page's answer to "how does a browser send a key": Basic auth, asked for once, then
    sent by the browser with the page script's own /api/v1/predict calls too."""
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip(f"{chromium} is missing (`make system-deps`)")
    sync_api = pytest.importorskip("playwright.sync_api")
    log = tmp_path / "access.jsonl"
    server = live_server_factory(model_root, workers=1, threads=4, config={
        "API_KEYS_FILE": str(keys_file), "ACCESS_LOG": str(log), "RELOAD_INTERVAL": 0})
    image = tmp_path / "red.png"
    image.write_bytes(image_bytes((240, 20, 20)))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium,
                                             args=["--headless", "--no-sandbox", "--disable-gpu"])
        context = browser.new_context(http_credentials={"username": "me", "password": alice})
        page = context.new_page()
        page.set_default_timeout(20_000)
        assert page.goto(server.url + "/").status == 200
        page.set_input_files("#file-input", [str(image)])
        assert page.locator("#results .result .top-label").first.inner_text() == "airplane"
        browser.close()
    server.stop()
    calls = [(e["method"], e["path"], e["status"], e["key"]) for e in
             map(json.loads, log.read_text().splitlines()) if e["path"] == PREDICT]
    assert calls == [("POST", PREDICT, 200, "alice")]
