"""A closed-loop HTTP load generator on asyncio streams (stdlib only), used by serve_load.py.

`concurrency` connections, each with one request in flight at a time over HTTP/1.1 keep-alive,
cycle through pre-built request bytes for a fixed time. Requests that start during the warm-up
are sent but not counted. Every wait is bounded (connect, response), so a stuck server costs at
most REQUEST_TIMEOUT past the deadline.

    phase = asyncio.run(run_phase("127.0.0.1", 8000, payloads, concurrency=8, duration=15))
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

CONNECT_TIMEOUT = 5.0  # seconds
REQUEST_TIMEOUT = 30.0  # seconds for one response, from writing the request
RECONNECT_PAUSE = 0.05  # seconds to wait after a failed connect before trying again
BOUNDARY_PLACEHOLDER = b"----convnetLoadBoundaryXXXXXXXXXXXXXXXX"  # 16 X: 16 random hex digits


def http_request(host: str, port: int, path: str, body: bytes, content_type: str) -> bytes:
    """One complete HTTP/1.1 POST, ready to write to a socket."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nAccept: application/json\r\n\r\n")
    return head.encode() + body


def multipart_request(host: str, port: int, path: str, field_name: str,
                      images: list[bytes]) -> bytes:
    """POST of `images` as multipart/form-data parts all named `field_name`. The boundary is a
    placeholder that `run_phase` replaces by a fresh random one per request, as browsers, curl
    and requests do (a server that compiles a pattern per boundary pays for it here too)."""
    boundary = BOUNDARY_PLACEHOLDER.decode()
    parts = [(f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
              f'filename="image{i}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n').encode()
             + image + b"\r\n" for i, image in enumerate(images)]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return http_request(host, port, path, body, f"multipart/form-data; boundary={boundary}")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep-alive?) of one response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ", 2)[:2]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # the empty trailer
        body = b"".join(chunks)
    else:
        return int(status), await reader.read(), False  # ends when the server closes
    keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
    return int(status), body, keep


@dataclass
class Phase:
    """What one load phase saw; `latencies` are seconds of the counted, successful requests."""

    concurrency: int
    images_per_request: int
    elapsed: float = 0.0  # seconds from the end of warm-up to the last counted answer
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)  # "HTTP 503", "ConnectionResetError"...
    client_cpu: float = 0.0  # CPU seconds this process spent after the warm-up
    server_cpu: float | None = None  # CPU seconds the server spent meanwhile, if measured

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def summary(self) -> dict:
        ms = np.asarray(self.latencies) * 1000 if self.latencies else np.zeros(1)
        elapsed = max(self.elapsed, 1e-9)
        return {
            "concurrency": self.concurrency,
            "requests": self.ok,
            "requests_per_s": self.ok / elapsed,
            "images_per_s": self.ok * self.images_per_request / elapsed,
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)),
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "client_cpu_percent": 100 * self.client_cpu / max(self.elapsed, 1e-9),
            # Robust to other jobs on the machine, unlike requests/s: what one request costs.
            "server_cpu_ms_per_request": (
                1000 * self.server_cpu / max(self.ok + sum(self.errors.values()), 1)
                if self.server_cpu is not None else None),
        }


async def _connection(host, port, payloads, offset, measure_from, stop_at, phase, check, ends):
    conn = None
    i = offset
    while time.perf_counter() < stop_at:
        if conn is None:
            try:
                conn = await asyncio.wait_for(asyncio.open_connection(host, port),
                                              CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                if time.perf_counter() >= measure_from:
                    phase.errors[type(exc).__name__] += 1
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
        reader, writer = conn
        payload = payloads[i % len(payloads)]
        if BOUNDARY_PLACEHOLDER in payload:
            boundary = BOUNDARY_PLACEHOLDER[:-16] + os.urandom(8).hex().encode()
            payload = payload.replace(BOUNDARY_PLACEHOLDER, boundary)
        i += 1
        started = time.perf_counter()
        counted = started >= measure_from
        try:
            writer.write(payload)
            status, body, keep = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:
            if counted:
                phase.errors[type(exc).__name__] += 1
            writer.close()
            conn = None
            continue
        if counted:
            ends.append(time.perf_counter())
            if status == 200 and check(body):
                phase.latencies.append(ends[-1] - started)
            else:
                phase.errors[f"HTTP {status}"] += 1
        if not keep:
            writer.close()
            conn = None
    if conn is not None:
        conn[1].close()


async def run_phase(host: str, port: int, payloads: list[bytes], *, concurrency: int,
                    duration: float, warmup: float = 2.0, images_per_request: int = 1,
                    check=lambda body: b'"label"' in body,
                    server_cpu: Callable[[], float] | None = None) -> Phase:
    """Drive the server for warmup + duration seconds; count what started after the warm-up.
    server_cpu: returns the server's CPU seconds so far, read after the warm-up and at the end."""
    phase = Phase(concurrency, images_per_request)
    measure_from = time.perf_counter() + warmup
    stop_at = measure_from + duration
    ends: list[float] = []
    cpu_at_start: list[float] = []
    server_at_start: list[float] = []

    async def note_cpu() -> None:
        await asyncio.sleep(warmup)
        cpu_at_start.append(time.process_time())
        if server_cpu is not None:
            server_at_start.append(server_cpu())

    step = max(1, len(payloads) // concurrency)  # connections start at different payloads
    await asyncio.gather(note_cpu(), *(
        _connection(host, port, payloads, k * step, measure_from, stop_at, phase, check, ends)
        for k in range(concurrency)
    ))
    phase.elapsed = (max(ends) if ends else time.perf_counter()) - measure_from
    phase.client_cpu = time.process_time() - cpu_at_start[0]
    if server_cpu is not None:
        phase.server_cpu = server_cpu() - server_at_start[0]
    return phase
