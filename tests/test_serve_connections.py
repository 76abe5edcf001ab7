"""Kept-alive connections spread over gunicorn's workers (serve/connections.py, serve/worker.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import pytest
from conftest import http
from traffic import children, metric_values, wait_for

from convnet.serve.connections import FREE, ConnectionLedger

BURST = 32  # connections opened at once, as a client pool does


def test_ledger_claims_publishes_and_frees_slots():
    ledger = ConnectionLedger(slots=3)
    assert [ledger.claim(), ledger.claim(), ledger.claim(), ledger.claim()] == [0, 1, 2, None]
    ledger.publish(0, 5, accepting=True)
    ledger.publish(1, 2, accepting=False)  # stopping, or at its connection cap: not counted
    ledger.publish(2, 4, accepting=True)
    assert ledger.fewest_elsewhere(0) == 4 and ledger.fewest_elsewhere(2) == 5
    ledger.release(2)
    assert ledger.fewest_elsewhere(0) is None  # the only other worker does not accept
    assert ledger.live() == {0: (5, True), 1: (2, False)} and ledger.counts[2] == FREE
    assert ledger.claim() == 2  # a replacement worker takes the freed slot


def open_burst(port: int, count: int) -> list[socket.socket]:
    """`count` connections made at once, each then asked one keep-alive request and left open."""
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    for sock in sockets:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    for sock in sockets:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return sockets


def connections_by_worker(url: str) -> list[float]:
    """convnet_worker_connections of each live worker (the /metrics request's own included)."""
    return sorted(metric_values(url, "convnet_worker_connections"))


@pytest.mark.slow
def test_a_burst_of_kept_alive_connections_is_spread_evenly(live_server_factory, model_root):
    # Without the ledger, bursts like this split 1/31 or 2/30 as often as evenly.
    server = live_server_factory(model_root, workers=2, threads=2)
    # The factory waits until both workers accept (conftest's workers_serving): a worker that
    # has loaded its model can take seconds more to reach its accept loop on a slow machine, and
    # nobody stands back for a worker that does not accept yet (CI once split a burst 1/32).
    assert metric_values(server.url, "convnet_worker_accepting") == [1, 1]
    for _ in range(3):
        sockets = open_burst(server.port, BURST)
        try:
            fewer, more = connections_by_worker(server.url)
            assert fewer + more == BURST + 1 and more - fewer <= 3, (fewer, more)
        finally:
            for sock in sockets:
                sock.close()
        # Closed connections leave the counts (the next request's own connection aside).
        assert wait_for(lambda: sum(connections_by_worker(server.url)) <= 1, timeout=10)


@pytest.mark.slow
def test_a_worker_that_cannot_accept_does_not_hold_connections_up(live_server_factory,
                                                                   model_root):
    # A stopped worker still looks idle in the ledger; the other one stands back for a moment
    # at most (connections.DEFER_LIMIT_S) and then serves every new connection itself.
    server = live_server_factory(model_root, workers=2, threads=2)
    stopped = children(server.process.pid)[0]
    os.kill(stopped, signal.SIGSTOP)
    held: list[socket.socket] = []
    try:
        started = time.monotonic()
        held = open_burst(server.port, 8)  # all on the running worker, well above the other
        assert time.monotonic() - started < 2.0
        for _ in range(12):
            started = time.monotonic()
            status = http("GET", server.url + "/healthz", timeout=5)[0]
            assert status == 200 and time.monotonic() - started < 1.0
    finally:
        for sock in held:
            sock.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
