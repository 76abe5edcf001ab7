"""Faults under load, against the real server: a worker killed with SIGKILL, a new model version
dropped in, a corrupt version dropped in. Each test keeps 8 client threads busy (a new connection
per request, so "in flight" is well defined) for a bounded time."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from conftest import TINY_WEIGHTS, http, write_version
from hostile_inputs import encoded, image_probe
from traffic import children, metric_values, run_load, wait_for

pytestmark = pytest.mark.slow

CONCURRENCY = 8
MAX_REQUESTS = 20_000  # a bound on every load loop here
RED = image_probe("red JPEG", encoded((255, 0, 0)), (200,))
RED_LABEL = {1: "airplane", 2: "bird"}  # what each version of conftest's tiny model answers
KILL_GRACE = 0.05  # seconds: a request started this long after the kill cannot be in flight


def judge_red(status, body) -> str | None:
    """A 200 whose label matches the version that answered: no mixing during a swap."""
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    answer = json.loads(body)
    label = answer["predictions"][0]["label"]
    return None if RED_LABEL.get(answer["version"]) == label else f"{label} from {answer}"


def pick_red(i):
    return RED, judge_red


def in_background(**kwargs):
    """run_load in a thread; returns (thread, stop event, list the outcomes land in)."""
    stop, result = threading.Event(), []
    thread = threading.Thread(target=lambda: result.extend(run_load(stop=stop, **kwargs)))
    thread.start()
    return thread, stop, result


def test_a_killed_worker_costs_at_most_its_requests_in_flight(live_server_factory, model_root):
    server = live_server_factory(model_root, workers=2, threads=4)
    master = server.process.pid
    workers = children(master)
    killed_at = []

    def kill_one() -> None:
        time.sleep(1.5)
        killed_at.append(time.monotonic())
        os.kill(workers[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_one)
    killer.start()
    outcomes = run_load(server.port, pick_red, concurrency=CONCURRENCY, duration=7.0,
                        max_requests=MAX_REQUESTS)
    killer.join()
    kill = killed_at[0]

    failed = [o for o in outcomes if o.error]
    print(f"{len(outcomes)} requests, {len(failed)} failed when the worker was killed")
    assert all(o.status is None for o in failed), failed[:3]  # connection errors, never a 5xx
    assert all(o.started < kill + KILL_GRACE and o.ended > kill - KILL_GRACE
               for o in failed), failed[:3]
    assert len(failed) <= CONCURRENCY
    # Whole again within 5 s: gunicorn forked a replacement that loaded the model and answers.
    assert wait_for(lambda: len(children(master)) == 2 and workers[0] not in children(master)
                    and len(metric_values(server.url, "convnet_model_version")) == 2,
                    timeout=max(0.0, kill + 5 - time.monotonic()))
    late = [o for o in outcomes if o.started > kill + 5]
    assert late and not any(o.error for o in late)


def test_a_new_version_under_load_fails_no_request(live_server_factory, fresh_root):
    server = live_server_factory(fresh_root, workers=2, threads=4,
                                 config={"RELOAD_INTERVAL": 0.2})
    thread, stop, outcomes = in_background(port=server.port, pick=pick_red,
                                           concurrency=CONCURRENCY, duration=30.0,
                                           max_requests=MAX_REQUESTS)
    try:
        time.sleep(1.0)
        write_version(fresh_root, 2, weights=TINY_WEIGHTS[2])
        swapped = wait_for(lambda: metric_values(server.url, "convnet_model_version")
                           == [2.0, 2.0], timeout=15)
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join()
    assert swapped, metric_values(server.url, "convnet_model_version")
    failed = [o for o in outcomes if o.error]
    print(f"{len(outcomes)} requests during the swap, {len(failed)} failed")
    assert not failed, failed[:5]
    versions = {o.version for o in outcomes}
    assert versions == {1, 2}


def test_a_corrupt_version_under_load_is_refused_and_the_old_one_serves(live_server_factory,
                                                                        fresh_root):
    server = live_server_factory(fresh_root, workers=2, threads=4,
                                 config={"RELOAD_INTERVAL": 0.2})
    thread, stop, outcomes = in_background(port=server.port, pick=pick_red,
                                           concurrency=CONCURRENCY, duration=30.0,
                                           max_requests=MAX_REQUESTS)

    def refused() -> bool:
        status, _, body = http("GET", server.url + "/readyz")
        versions = [r["version"] for r in json.loads(body)["refused"]]
        return status == 200 and versions == [2] and metric_values(
            server.url, "convnet_model_refused_version") == [2.0]

    try:
        time.sleep(1.0)
        write_version(fresh_root, 2, onnx_bytes=b"\x08\x07 this is not a model")
        seen = wait_for(refused, timeout=15)
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join()
    assert seen
    failed = [o for o in outcomes if o.error]
    assert not failed, failed[:5]
    assert {o.version for o in outcomes} == {1}
    _, err = server.stop()
    assert "refused model version 2" in err and "still serving version 1" in err
