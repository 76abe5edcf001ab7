"""deploy/replicas.sh: two `convnet serve` replicas behind nginx. Requests reach both replicas;
a replica killed with SIGKILL under load costs no request (nginx retries what it had in flight on
the other one) and is started again; Ctrl-C stops every process and removes the run folder."""

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
from pathlib import Path

import pytest
from conftest import free_port, http
from hostile_inputs import encoded, image_probe
from traffic import alive, children, run_load, wait_for

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
def replicas(model_root, tmp_path):
    """Run the script; yield (nginx port, replica ports, run dir, process); stop it after."""
    port, replica_ports = free_port(), [free_port(), free_port()]
    convnet = Path(sys.executable).with_name("convnet")
    env = {**os.environ, "REPLICAS": "2", "PORT": str(port), "MODEL": str(model_root),
           "REPLICA_PORTS": " ".join(map(str, replica_ports)), "NGINX": NGINX,
           "CONVNET": str(convnet)}
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
