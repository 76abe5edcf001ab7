"""The request threads of `convnet serve`'s worker (serve/pollworker.py), on a real gunicorn."""

from __future__ import annotations

import signal
import socket
import time

import pytest
from conftest import http
from traffic import metric_values, wait_for

from convnet.serve.pollworker import ClientSocket

HEALTH = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"


def read_answers(sock: socket.socket, count: int, timeout: float = 10) -> list[bytes]:
    """The status lines of the next `count` answers on `sock` (fewer if it closes first)."""
    sock.settimeout(timeout)
    data, statuses = b"", []
    while len(statuses) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            head = data[:head_end].split(b"\r\n")
            length = next(int(line.split(b":")[1]) for line in head
                          if line.lower().startswith(b"content-length:"))
            if len(data) >= head_end + 4 + length:
                statuses.append(head[0])
                data = data[head_end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return statuses


def upload(jpeg: bytes) -> bytes:
    boundary = b"b0undary"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; '
            b'filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n' + jpeg + b"\r\n--" + boundary
            + b"--\r\n")
    return (b"POST /api/v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; "
            b"boundary=" + boundary + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(out, "JPEG")
    return out.getvalue()


@pytest.fixture
def server(live_server_factory, model_root):
    return live_server_factory(model_root, workers=1, threads=2)


@pytest.mark.slow
def test_requests_sent_back_to_back_on_one_connection_are_all_answered(server, jpeg):
    # The second and third arrive with the first: no readiness event is left for them, since
    # gunicorn has read them off the socket already; the thread must answer them at once.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(HEALTH + upload(jpeg) + HEALTH)
        assert read_answers(sock, 3) == [b"HTTP/1.1 200 OK"] * 3
        sock.sendall(upload(jpeg))  # and the connection is still served after them
        assert read_answers(sock, 1) == [b"HTTP/1.1 200 OK"]


@pytest.mark.slow
def test_more_kept_alive_connections_than_threads_are_all_served(server, jpeg):
    sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(12)]
    try:
        for _ in range(3):
            for sock in sockets:
                sock.sendall(upload(jpeg))
            for sock in sockets:
                assert read_answers(sock, 1) == [b"HTTP/1.1 200 OK"]
        fewest = metric_values(server.url, "convnet_worker_connections")
        assert fewest == [12 + 1]  # the /metrics request's own connection too
    finally:
        for sock in sockets:
            sock.close()
    assert wait_for(lambda: metric_values(server.url, "convnet_worker_connections") == [1], 10)


@pytest.mark.slow
def test_a_stalled_client_holds_one_thread_and_not_the_others(server, jpeg):
    with socket.create_connection(("127.0.0.1", server.port)) as stalled:
        stalled.sendall(upload(jpeg)[:120])  # headers begun, then nothing
        time.sleep(0.3)
        for _ in range(5):
            started = time.monotonic()
            assert http("GET", server.url + "/healthz", timeout=5)[0] == 200
            assert time.monotonic() - started < 2


@pytest.mark.slow
def test_an_idle_connection_is_closed_after_the_keepalive_and_no_sooner(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(HEALTH)
        assert read_answers(sock, 1) == [b"HTTP/1.1 200 OK"]
        time.sleep(3)  # idle for less than the server's keepalive (5 s)
        sock.sendall(HEALTH)
        assert read_answers(sock, 1) == [b"HTTP/1.1 200 OK"]
        idle_since = time.monotonic()
        sock.settimeout(15)
        assert sock.recv(1) == b""  # closed by the server
        assert 4 < time.monotonic() - idle_since < 8
    # and counted out: only the /metrics request's own connection is left
    assert wait_for(lambda: metric_values(server.url, "convnet_worker_connections") == [1], 10)


@pytest.mark.slow
def test_the_gthread_worker_for_systems_without_epoll_serves_too(live_server_factory,
                                                                  model_root, jpeg):
    server = live_server_factory(
        model_root, workers=2, threads=2, setup="import convnet.serve.server as s; "
        "s.WORKER_CLASS = 'convnet.serve.worker.DrainingThreadWorker'")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        for _ in range(3):
            sock.sendall(upload(jpeg))
            assert read_answers(sock, 1) == [b"HTTP/1.1 200 OK"]
    assert sorted(metric_values(server.url, "convnet_worker_accepting")) == [1, 1]
    assert "PollingThreadWorker" not in server.stop()[1]


def test_client_socket_sets_a_timeout_only_when_it_changes(monkeypatch):
    calls = []
    original = socket.socket.settimeout
    monkeypatch.setattr(socket.socket, "settimeout",
                        lambda self, value: (calls.append(value), original(self, value)))
    mine, other = socket.socketpair()
    sock = ClientSocket(mine.family, mine.type, mine.proto, fileno=mine.detach())
    with sock, other:
        sock.setblocking(True)  # blocking already: nothing to do
        sock.settimeout(None)
        assert calls == [] and sock.gettimeout() is None
        sock.setblocking(False)
        sock.settimeout(0.0)
        sock.settimeout(2.5)
        sock.settimeout(2.5)
        assert calls == [0.0, 2.5] and sock.gettimeout() == 2.5
        other.sendall(b"x")
        assert sock.recv(1) == b"x"


def test_worker_class_is_the_polling_one_on_linux():
    from gunicorn.util import load_class

    from convnet.serve import server
    from convnet.serve.worker import DrainingThreadWorker

    expected = "PollingThreadWorker" if hasattr(__import__("select"), "epoll") else "Draining"
    assert expected in server.WORKER_CLASS
    # what gunicorn will load: the draining shutdown and the connection ledger come with it
    assert issubclass(load_class(server.WORKER_CLASS), DrainingThreadWorker)


@pytest.mark.slow
def test_a_stopping_server_answers_a_kept_alive_connection_once_more_and_closes_it(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(HEALTH)
        assert read_answers(sock, 1) == [b"HTTP/1.1 200 OK"]
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the worker is stopping: no new connections, this one lingers
        sock.sendall(HEALTH)
        sock.settimeout(5)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in answer
    assert server.process.wait(timeout=15) == 0
