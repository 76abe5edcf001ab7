"""deploy/replicas.sh: two `convnet serve` replicas behind nginx. Requests reach both replicas;
a replica killed with SIGKILL under load costs no request (nginx retries what it had in flight on
the other one) and is started again; Ctrl-C stops every process and removes the run folder.
Bodies up to the limit stay in nginx's memory, nginx's own errors are JSON like the app's, and a
replica's 503 (decode budget full) reaches the client without taking the replicas out."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import free_port, http
from hostile_inputs import encoded, image_probe, png
from traffic import alive, children, exchange, json_error, run_load, wait_for

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed")]

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "replicas.sh"
START_TIMEOUT = 60  # seconds for both replicas and nginx
RED = image_probe("red JPEG", encoded((255, 0, 0)), (200,))
CONCURRENCY = 8


def judge(status, body):
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    return None if json.loads(body)["predictions"][0]["label"] == "airplane" else "wrong label"


def ready(port: int) -> bool:
    try:
        return http("GET", f"http://127.0.0.1:{port}/readyz", timeout=2)[0] == 200
    except OSError:  # not listening (yet)
        return False


def predict_count(port: int) -> float:
    _, _, body = http("GET", f"http://127.0.0.1:{port}/metrics")
    found = re.search(r'convnet_http_requests_total\{[^}]*route="/api/v1/predict"[^}]*'
                      r'status="200"[^}]*\} (\S+)', body.decode())
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def replica_env() -> dict:
    """Environment for the replicas beyond the script's own settings (CONVNET_* app settings)."""
    return {}


@pytest.fixture
def replicas(model_root, tmp_path, replica_env):
    """Run the script; yield (nginx port, replica ports, run dir, process, log); stop it after."""
    port, replica_ports = free_port(), [free_port(), free_port()]
    convnet = Path(sys.executable).with_name("convnet")
    env = {**os.environ, "REPLICAS": "2", "PORT": str(port), "MODEL": str(model_root),
           "REPLICA_PORTS": " ".join(map(str, replica_ports)), "NGINX": NGINX,
           "CONVNET": str(convnet), **replica_env}
    log = tmp_path / "replicas.log"
    with open(log, "wb") as out:
        # Ctrl-C must reach the script's trap even when pytest itself runs in the background,
        # where the shell started it with SIGINT ignored (bash cannot trap what it inherits
        # ignored): give the script the default disposition back.
        process = subprocess.Popen(["bash", str(SCRIPT), "--", "--workers", "1", "--threads", "4"],
                                   stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, preexec_fn=_default_sigint)
    try:
        assert wait_for(lambda: "replicas: ready" in log.read_text() or process.poll() is not None,
                        timeout=START_TIMEOUT), log.read_text()
        assert process.poll() is None, log.read_text()
        run_dir = Path(re.search(r"run dir (\S+)", log.read_text()).group(1))
        yield port, replica_ports, run_dir, process, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_replicas_behind_nginx_survive_a_killed_replica(replicas):
    port, replica_ports, run_dir, process, log = replicas
    url = f"http://127.0.0.1:{port}"
    status, _, body = http("GET", url + "/readyz")
    assert status == 200 and json.loads(body)["ready"]
    outcomes = run_load(port, lambda i: (RED, judge), concurrency=4, duration=10,
                        max_requests=40)
    assert len(outcomes) == 40 and not [o for o in outcomes if o.error]
    assert all(predict_count(p) > 0 for p in replica_ports)  # least_conn used both

    victim = int((run_dir / "replica-0.pid").read_text())
    killed_at = []

    def kill_replica() -> None:
        time.sleep(1.5)
        group = [victim, *children(victim)]  # gunicorn master and its worker
        killed_at.append(time.monotonic())
        for pid in group:
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_replica)
    killer.start()
    outcomes = run_load(port, lambda i: (RED, judge), concurrency=CONCURRENCY, duration=6,
                        max_requests=20_000)
    killer.join()
    failed = [o for o in outcomes if o.error]
    print(f"{len(outcomes)} requests through nginx, {len(failed)} failed when a replica died")
    # nginx retries a request the dead replica had in flight on the live one, so usually none
    # fails. It cannot once it has passed the replica's response header on to the client (the
    # body never comes): so at most the requests in flight when the replica died may fail.
    kill = killed_at[0]
    assert all(o.started < kill + 0.05 and o.ended > kill - 0.05 for o in failed), failed[:3]
    assert len(failed) <= CONCURRENCY, failed[:3]
    assert sum(1 for o in outcomes if o.started > kill) > 20

    # The script starts the dead replica again, on the same port.
    assert wait_for(lambda: (run_dir / "replica-0.pid").read_text().strip() != str(victim)
                    and ready(replica_ports[0]), timeout=30), log.read_text()
    assert "replica 0" in log.read_text() and "starting it again" in log.read_text()

    pids = [int((run_dir / f"replica-{i}.pid").read_text()) for i in range(2)]
    nginx_pid = int((run_dir / "nginx.pid").read_text())
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130, log.read_text()  # the status after Ctrl-C
    assert wait_for(lambda: not any(alive(p) for p in [*pids, nginx_pid]), timeout=10)
    assert not run_dir.exists()
    assert "replicas: stopped" in log.read_text()


MIB = 2**20
BOMB_PIXELS = 3000 * 3000  # the replicas' MAX_IMAGE_PIXELS, so also each one's decode budget


@pytest.mark.parametrize("replica_env", [{"CONVNET_MAX_IMAGE_PIXELS": str(BOMB_PIXELS)}])
def test_nginx_keeps_bodies_in_memory_and_answers_json(replicas):
    port, _, run_dir, _, _ = replicas
    # Up to the limit, declared or chunked, well over nginx's default buffer: the replica judges
    # them (zeros are no image). The chunked body pauses before its end, so nginx holds all of
    # it before knowing that it ends: a buffer no larger than the limit is full then, and goes
    # to disk (most times, not every time: hence three of them).
    def pausing_before_the_end():
        yield from [bytes(MIB)] * 10
        time.sleep(0.3)

    for chunks in (None, *(pausing_before_the_end() for _ in range(3))):
        big = image_probe("10 MiB of zeros", bytes(10 * MIB) if chunks is None else b"")
        answer = exchange(port, big, chunks=chunks)
        assert answer.status == 400 and "not a supported image" in json_error(answer.body)

    # Over the limit, declared or chunked: nginx's own 413, in the app's shape.
    for chunks in (None, [bytes(MIB)] * 11):
        too_big = image_probe("11 MiB", bytes(11 * MIB) if chunks is None else b"")
        answer = exchange(port, too_big, chunks=chunks)
        assert answer.status == 413 and answer.headers["Content-Type"] == "application/json"
        assert "over the limit of 10485760 bytes" in json_error(answer.body)

    # Grey + alpha bombs at the replicas' pixel limit, 8 at once: each replica decodes one at a
    # time and refuses the rest with 503 + Retry-After, which must reach the client as they are
    # and leave both replicas in service (a retried 503 counts as a failure in nginx).
    bomb = image_probe("3000 x 3000 grey + alpha PNG", png(3000, 3000, color_type=4, bit_depth=8),
                       content_type="image/png")
    start = threading.Barrier(8)

    def fire(_):
        start.wait()
        return exchange(port, bomb, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(fire, range(8)))
    assert {a.status for a in answers} == {200, 503}, [a.status for a in answers]
    for answer in answers:
        if answer.status == 503:
            assert answer.headers["Retry-After"] == "1" and "retry" in json_error(answer.body)
    after = run_load(port, lambda i: (RED, judge), concurrency=2, duration=10, max_requests=10)
    assert [o.error for o in after] == [None] * 10

    error_log = (run_dir / "logs" / "error.log").read_text()
    assert "buffered to a temporary file" not in error_log, error_log
