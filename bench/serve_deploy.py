"""The figures behind deploy/k8s: a container's memory under load, and what SIGTERM costs.

    .venv/bin/python bench/serve_deploy.py                      # ~1 min: 600 requests, 5 stops
    .venv/bin/python bench/serve_deploy.py --requests 2000 --stops 20 --out /tmp/try

Runs the container's start command (deploy/Dockerfile's CMD, on a free loopback port) with the
bundled model from a fresh temporary folder, as the image would:

1. memory: `--requests` predictions from `--concurrency` clients, half 32x32 JPEGs (CIFAR-10's
   size) and half 1024x768 photos (decoded and resized on the server); the resident memory of the
   master and its workers is sampled every 50 ms. Reported: the peak of their summed RSS (what
   `ps` shows; shared pages counted once per process) and of their summed PSS (shared pages split
   between processes: what the pod's cgroup is charged, closer than RSS).
2. shutdown: `--stops` times, a fresh server under the same load gets SIGTERM (what the kubelet
   sends) after `--warm` seconds; the clients go on until it has exited. Every request is either
   answered (its status counted), refused at connect (the listener closed: fine, the client may
   retry elsewhere), or lost: reset or closed after the connection was made, or a 5xx.
   --control repeats the stops with gunicorn's own gthread shutdown (serve/worker.py's override
   undone), to show what that override buys.

Writes bench/results/serve_deploy.md/.json (or --out).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import RESULTS, free_port, write_results
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
START_TIMEOUT = 60  # seconds for the server to answer /readyz


# `convnet` with DrainingThreadWorker's listener handling undone: plain gthread on SIGTERM.
PLAIN_GTHREAD = (
    "import sys; from gunicorn.workers.gthread import ThreadWorker; "
    "import convnet.serve.worker as w; "
    "w.DrainingThreadWorker.set_accept_enabled = ThreadWorker.set_accept_enabled; "
    "from convnet.cli import main; sys.argv[0] = 'convnet'; sys.exit(main())"
)


def container_command(port: int, plain_gthread: bool = False) -> list[str]:
    """The Dockerfile's CMD (exec form), with this venv's convnet and a loopback port."""
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("CMD "):
            argv = json.loads(line[4:])
            break
    else:
        raise SystemExit(f"{DOCKERFILE} has no CMD line")
    argv[0] = str(Path(sys.executable).with_name(argv[0]))
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    if plain_gthread:
        argv[:1] = [sys.executable, "-c", PLAIN_GTHREAD]
    return argv


def jpeg(size: tuple[int, int], seed: int) -> bytes:
    pixels = bytes((seed * 7 + i * 13) % 256 for i in range(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


BODIES = [jpeg((32, 32), 1), jpeg((1024, 768), 2)]


def predict(port: int, body: bytes) -> str:
    """One POST /api/v1/predict on a new connection: 'refused', 'no connection: ...' (connect
    failed otherwise; nothing was sent), 'lost: ...' or the status."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return f"no connection: {type(exc).__name__}"
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.sock = sock
        conn.request("POST", "/api/v1/predict", body,
                     {"Content-Type": "image/jpeg", "Connection": "close"})
        response = conn.getresponse()
        response.read()
        return str(response.status)
    except (OSError, http.client.HTTPException) as exc:
        return f"lost: {type(exc).__name__}"
    finally:
        sock.close()


class Server:
    def __init__(self, workdir: Path, plain_gthread: bool = False):
        self.port = free_port()
        self.argv = container_command(self.port, plain_gthread)
        self.log = open(workdir / f"server-{self.port}.log", "wb")
        self.process = subprocess.Popen(self.argv, cwd=workdir, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited: see {self.log.name}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"server not ready in {START_TIMEOUT} s")

    def pids(self) -> list[int]:
        found = [self.process.pid]
        for pid in list(found):
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            found += [int(k) for k in kids]
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def memory_mib(pids: list[int]) -> tuple[float, float]:
    """(summed RSS, summed PSS) of `pids` in MiB; a process gone meanwhile counts 0."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


def load(port: int, concurrency: int, count: int | None, stop: threading.Event) -> Counter:
    """`count` requests (None: until `stop`) from `concurrency` threads; outcomes counted."""
    outcomes: Counter = Counter()
    lock = threading.Lock()
    numbers = iter(range(count if count is not None else 10**9))

    def client() -> None:
        while not stop.is_set():
            with lock:
                i = next(numbers, None)
            if i is None:
                return
            outcome = predict(port, BODIES[i % len(BODIES)])
            with lock:
                outcomes[outcome] += 1
            if outcome == "refused" or outcome.startswith("no connection"):
                time.sleep(0.01)  # as a client retrying elsewhere would: not a busy loop

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    return outcomes


def measure_memory(workdir: Path, requests: int, concurrency: int) -> dict:
    server = Server(workdir)
    try:
        idle_rss, idle_pss = memory_mib(server.pids())
        peak = [idle_rss, idle_pss]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss, pss = memory_mib(server.pids())
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        outcomes = load(server.port, concurrency, requests, threading.Event())
        seconds = time.monotonic() - started
        done.set()
        sampler.join()
        return {"command": shlex.join(server.argv), "processes": len(server.pids()),
                "idle_rss_mib": round(idle_rss), "idle_pss_mib": round(idle_pss),
                "peak_rss_mib": round(peak[0]), "peak_pss_mib": round(peak[1]),
                "requests": requests, "seconds": round(seconds, 1),
                "outcomes": dict(outcomes)}
    finally:
        server.stop()


def measure_stop(workdir: Path, concurrency: int, warm: float, plain_gthread: bool = False) -> dict:
    server = Server(workdir, plain_gthread)
    stop = threading.Event()
    result: dict = {}
    with ThreadPoolExecutor(1) as pool:
        traffic = pool.submit(load, server.port, concurrency, None, stop)
        time.sleep(warm)
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=30)
        result["exit_seconds"] = round(time.monotonic() - sent, 2)
        result["returncode"] = server.process.returncode
        time.sleep(1.0)  # clients now meet a closed port
        stop.set()
        outcomes = traffic.result()
    server.stop()
    result["outcomes"] = dict(outcomes)
    result["lost"] = sum(n for k, n in outcomes.items()
                         if k.startswith("lost") or k.startswith("5"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--stops", type=int, default=5)
    parser.add_argument("--warm", type=float, default=2.0, help="seconds of load before SIGTERM")
    parser.add_argument("--control", action="store_true",
                        help="also stop servers running gunicorn's own gthread shutdown")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_deploy")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="convnet-deploy-bench-") as tmp:
        workdir = Path(tmp)
        memory = measure_memory(workdir, args.requests, args.concurrency)
        print("memory:", json.dumps(memory), flush=True)
        stops = []
        for i in range(args.stops):
            stops.append(measure_stop(workdir, args.concurrency, args.warm))
            print(f"stop {i + 1}:", json.dumps(stops[-1]), flush=True)
        controls = []
        for i in range(args.stops if args.control else 0):
            controls.append(measure_stop(workdir, args.concurrency, args.warm, True))
            print(f"control stop {i + 1}:", json.dumps(controls[-1]), flush=True)

    lost = sum(s["lost"] for s in stops)
    answered = sum(n for s in stops for k, n in s["outcomes"].items() if k == "200")
    refused = sum(s["outcomes"].get("refused", 0) for s in stops)
    rows = [f"| {i + 1} | {s['outcomes'].get('200', 0)} | {s['outcomes'].get('refused', 0)} | "
            f"{s['lost']} | {s['exit_seconds']} | {s['returncode']} |"
            for i, s in enumerate(stops)]
    control_rows = [f"| {i + 1} (gthread's own) | {s['outcomes'].get('200', 0)} | "
                    f"{s['outcomes'].get('refused', 0)} | {s['lost']} | {s['exit_seconds']} | "
                    f"{s['returncode']} |" for i, s in enumerate(controls)]
    body = "\n".join([
        "## Memory under load", "",
        f"`{memory['command']}`, {memory['processes']} processes (master + workers), "
        f"{memory['requests']} predictions from {args.concurrency} clients in "
        f"{memory['seconds']} s (half 32x32 JPEGs, half 1024x768 photos): "
        f"{memory['outcomes']}.", "",
        "| | RSS summed (MiB) | PSS summed (MiB) |", "| --- | --- | --- |",
        f"| idle, after start | {memory['idle_rss_mib']} | {memory['idle_pss_mib']} |",
        f"| peak under load | {memory['peak_rss_mib']} | {memory['peak_pss_mib']} |", "",
        "## SIGTERM under load", "",
        f"{args.concurrency} clients, a new connection per request; SIGTERM to the gunicorn "
        f"master after {args.warm} s; lost = reset or closed after connecting, or a 5xx.", "",
        "| stop | 200 | refused at connect | lost | seconds to exit | exit code |",
        "| --- | --- | --- | --- | --- | --- |", *rows, *control_rows, "",
        f"Total (DrainingThreadWorker): {answered} answered 200, {refused} refused at connect, "
        f"{lost} lost."
        + (f" With gthread's own shutdown: {sum(s['lost'] for s in controls)} lost in "
           f"{len(controls)} stops." if controls else ""),
    ])
    write_results(args.out, "Deployment figures: memory under load, SIGTERM under load", body,
                  {"memory": memory, "stops": stops, "control_stops": controls,
                   "concurrency": args.concurrency, "lost": lost})
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
