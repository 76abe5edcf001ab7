"""Bounded traffic against a real server on 127.0.0.1, and a look at its processes.

`send` speaks raw HTTP on its own connection, reading the answer while the body is still being
written, so a server that answers early (a 413) and closes is seen answering, not as a reset;
`send_chunked` does the same with a chunked body of any length, even endless.
`run_load` keeps `concurrency` threads busy for at most `duration` seconds and `max_requests`
requests, recording every outcome. Used by the hostile-input, fault and nginx tests.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hostile_inputs import Probe

REQUEST_TIMEOUT = 30.0  # seconds for any one request


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    sent: int  # body bytes the client got to send: a server may answer before reading them all
    send_error: OSError | None  # why sending stopped short (the server closed), if it did


def exchange(port: int, probe: Probe, *, chunks: Iterable[bytes] | None = None,
             timeout: float = REQUEST_TIMEOUT, host: str = "127.0.0.1") -> Answer:
    """One request on a fresh connection. The body is `probe.body` with its Content-Length, or
    `chunks` sent chunked (Transfer-Encoding: chunked), the sending stopping once the answer is
    in. Raises OSError/HTTPException when no answer arrives."""
    framing = ({"Transfer-Encoding": "chunked"} if chunks is not None
               else {"Content-Length": str(len(probe.body))})
    headers = {"Host": f"{host}:{port}", "Connection": "close", **framing, **probe.headers}
    head = f"{probe.method} {probe.path} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    parts = [probe.body] if chunks is None else _chunked(chunks)
    answered = threading.Event()
    progress = {"sent": 0, "error": None}

    def write() -> None:
        try:
            sock.sendall(head.encode())
            for part in parts:
                if answered.is_set():
                    return
                sock.sendall(part)
                progress["sent"] += len(part)
        except OSError as exc:  # the server answered and closed first: the answer is what counts
            progress["error"] = exc

    with socket.create_connection((host, port), timeout=timeout) as sock:
        sender = threading.Thread(target=write, daemon=True)
        sender.start()
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
        answered.set()
        sender.join(timeout)
        return Answer(response.status, response.headers, body, progress["sent"],
                      progress["error"])


def _chunked(chunks: Iterable[bytes]) -> Iterable[bytes]:
    for chunk in chunks:
        if chunk:
            yield b"%x\r\n%s\r\n" % (len(chunk), chunk)
    yield b"0\r\n\r\n"


def send(port: int, probe: Probe, *, timeout: float = REQUEST_TIMEOUT,
         host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body). Raises OSError/HTTPException when no
    answer arrives."""
    answer = exchange(port, probe, timeout=timeout, host=host)
    return answer.status, answer.body


def json_error(body: bytes) -> str:
    """The message of a JSON error body (raises if the body is not one)."""
    payload = json.loads(body)
    assert isinstance(payload, dict) and isinstance(payload.get("error"), str), payload
    return payload["error"]


def top_label(body: bytes) -> str:
    """The first prediction's label, from our API or TF Serving's (for conftest's labels)."""
    payload = json.loads(body)
    if "predictions" in payload and isinstance(payload["predictions"][0], dict):
        return payload["predictions"][0]["label"]
    from conftest import CIFAR10_LABELS

    row = payload["predictions"][0]
    return CIFAR10_LABELS[max(range(len(row)), key=row.__getitem__)]


@dataclass
class Outcome:
    name: str
    started: float  # time.monotonic() seconds
    ended: float
    status: int | None  # None: no HTTP answer at all
    error: str | None = None  # why there was no answer, or why the answer was wrong
    version: int | None = None  # model version that answered, where the body says

    @property
    def answered(self) -> bool:
        return self.status is not None


def run_load(port: int, pick: Callable[[int], tuple[Probe, Callable[[int, bytes], str | None]]],
             *, concurrency: int, duration: float, max_requests: int,
             stop: threading.Event | None = None) -> list[Outcome]:
    """Send pick(i) = (probe, judge) requests from `concurrency` threads until `duration`
    seconds pass, `max_requests` are sent or `stop` is set. judge(status, body) returns None if
    the answer is right, else what is wrong with it."""
    deadline = time.monotonic() + duration
    counter = iter(range(max_requests))
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    stop = stop or threading.Event()

    def loop() -> None:
        while time.monotonic() < deadline and not stop.is_set():
            with lock:
                i = next(counter, None)
            if i is None:
                return
            probe, judge = pick(i)
            started = time.monotonic()
            try:
                status, body = send(port, probe)
            except (OSError, http.client.HTTPException) as exc:
                outcome = Outcome(probe.name, started, time.monotonic(), None, repr(exc))
            else:
                outcome = Outcome(probe.name, started, time.monotonic(), status,
                                  judge(status, body), _version(body))
            with lock:
                outcomes.append(outcome)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(loop) for _ in range(concurrency)]:
            future.result()
    return outcomes


def _version(body: bytes) -> int | None:
    try:
        value = json.loads(body).get("version")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def children(pid: int) -> list[int]:
    """Pids of the live child processes of `pid` (gunicorn's workers, for its master)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def reset_peak_memory(pid: int) -> bool:
    """Start a process's VmHWM afresh from its resident size now (Linux's clear_refs); False
    where the kernel does not allow it, and VmHWM keeps the peak since the process started."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def metric_values(url: str, name: str) -> list[float]:
    """Every sample of metric `name` in the server's /metrics (one per worker for the gauges
    that gunicorn's workers keep apart)."""
    from conftest import http

    _, _, body = http("GET", url + "/metrics")
    return [float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", body.decode(), re.M)]
