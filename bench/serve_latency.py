"""Latency of the real server: sequential single-image POST /api/v1/predict requests.

Starts `convnet.serve.server.run` (gunicorn) in a subprocess on a free port, sends one 32x32 JPEG
per request as a multipart upload over a keep-alive connection, and prints p50/p99/mean latency
and requests per second. Client and server share the machine, so this is the latency one client
sees, not the server's throughput.

    python bench/serve_latency.py                          # bundled model, 1,000 requests
    (writes bench/results/serve_latency.md and .json; --out '' writes nothing)
    python bench/serve_latency.py --model runs/cifar10 --requests 200
"""

from __future__ import annotations

import argparse
import http.client
import inspect
import io
import json
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, free_port, machine, write_results
from PIL import Image

from convnet.modeldir import PRECISIONS
from convnet.serve.server import run

CIFAR_TEST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg" / \
    "test.tar.gz"
BOUNDARY = "convnet-bench-boundary"
READY_TIMEOUT = 60  # seconds for gunicorn to boot and load the model


def sample_jpeg() -> tuple[bytes, str]:
    """A real CIFAR-10 test JPEG when the shared data is here, else a synthetic 32x32 one."""
    if CIFAR_TEST.is_file():
        with tarfile.open(CIFAR_TEST) as archive:
            for member in archive:
                if member.isfile() and member.name.endswith(".jpg"):
                    return archive.extractfile(member).read(), member.name
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue(), "synthetic 32x32 noise"


def multipart(image: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"image.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + image + \
        f"\r\n--{BOUNDARY}--\r\n".encode()


def start_server(model: str | None, port: int, workers: int, threads: int, precision: str,
                 log) -> subprocess.Popen:
    code = (f"from convnet.serve.server import run; run(model={model!r}, port={port}, "
            f"workers={workers}, threads={threads}, precision={precision!r})")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log)


def wait_ready(port: int, process: subprocess.Popen) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited during start-up; see its log above")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            response = conn.getresponse()
            body = json.loads(response.read())
            conn.close()
            if response.status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready after {READY_TIMEOUT} s")


def measure(port: int, body: bytes, count: int) -> np.ndarray:
    """Seconds per request for `count` sequential requests on one keep-alive connection."""
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = np.empty(count)
    for i in range(count):
        started = time.perf_counter()
        try:
            conn.request("POST", "/api/v1/predict", body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        except (http.client.HTTPException, ConnectionError):
            conn.close()  # the server closed an idle keep-alive connection: reconnect, retry
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/api/v1/predict", body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        times[i] = time.perf_counter() - started
        if response.status != 200:
            raise SystemExit(f"request {i} failed: {response.status} {payload[:200]!r}")
    conn.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model root or version folder (default: bundled)")
    parser.add_argument("--requests", type=int, default=1000, help="timed requests")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests first")
    serve_defaults = inspect.signature(run).parameters  # what `convnet serve` uses
    parser.add_argument("--workers", type=int, default=serve_defaults["workers"].default)
    parser.add_argument("--threads", type=int, default=serve_defaults["threads"].default)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the model file served (auto: int8 where the version has one)")
    parser.add_argument("--out", default=str(RESULTS / "serve_latency"),
                        help="results path without suffix (.md and .json); '' to skip")
    args = parser.parse_args()

    image, source = sample_jpeg()
    body = multipart(image)
    port = free_port()
    with tempfile.TemporaryFile() as log:
        server = start_server(args.model, port, args.workers, args.threads, args.precision,
                              log)
        try:
            ready = wait_ready(port, server)
            measure(port, body, args.warmup)
            started = time.perf_counter()
            times = measure(port, body, args.requests)
            elapsed = time.perf_counter() - started
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
            if server.returncode not in (0, -signal.SIGINT):
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-4000:])

    ms = times * 1000
    model = ready["model"]
    facts = [f"model: {model['name']} version {model['version']}, --precision {args.precision}",
             f"image: {source}, {len(image)} bytes, multipart upload, one per request, "
             f"sequential, one keep-alive connection, {args.warmup} untimed first",
             f"server: gunicorn, {args.workers} workers x {args.threads} threads, 127.0.0.1 "
             f"(client on the same machine)"]
    row = {"requests": len(ms), "p50_ms": float(np.percentile(ms, 50)),
           "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
           "max_ms": float(ms.max()), "requests_per_s": len(ms) / elapsed}
    table = ("| requests | p50 ms | p99 ms | mean ms | max ms | requests/s |\n"
             "|---------:|-------:|-------:|--------:|-------:|-----------:|\n"
             f"| {row['requests']:8d} | {row['p50_ms']:6.2f} | {row['p99_ms']:6.2f} | "
             f"{row['mean_ms']:7.2f} | {row['max_ms']:6.2f} | {row['requests_per_s']:10.1f} |")
    print("\n".join(facts) + f"\nmachine: {machine()}\n\n{table}")
    if args.out:
        write_results(Path(args.out), "Latency of one request (`bench/serve_latency.py`)", table,
                      {"result": row}, notes=tuple(facts))

if __name__ == "__main__":
    main()
