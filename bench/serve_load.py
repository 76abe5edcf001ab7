"""Serving under load: our server against a tutorial-style baseline, BentoML and the ONNX ceiling.

Drives POST .../predict with real CIFAR-10 test JPEGs (32x32) and the same images upscaled to
512x512 photos in memory, at each concurrency for a fixed time, one server at a time, and writes
a Markdown table (plus JSON) of requests/s, images/s, p50/p95/p99 latency, errors and the
servers' own CPU time per request (Linux /proc; it holds when other jobs share the machine):

    onnx      ONNX Runtime alone, batches of 64 decoded images, one process: the ceiling
    convnet   `convnet serve --precision float` (gunicorn, micro-batching), options below apply
    convnet-int8  the same with --precision int8 (model.int8.onnx; skipped if the version has none)
    baseline  bench/baseline_server.py: Flask's dev server, Keras model.predict per request
    bentoml   bench/bento_service.py: BentoML 1.4 with adaptive batching, in bench/.venv-bento
              (created here on first use, so BentoML's dependencies never touch ours)

    .venv/bin/python bench/serve_load.py --keras runs/cifar10   # ~17 min: 3 rounds, 10 s rows
    .venv/bin/python bench/serve_load.py --targets convnet --duration 5 --out /tmp/try
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8080       # e.g. through nginx

Client and servers share the machine, so the client's own CPU use is reported next to each row.
Every phase, start-up and request has a time limit: the run always ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import inspect
import io
import json
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from common import free_port
from loadgen import multipart_request, run_phase
from PIL import Image

from convnet.imaging import decode_image
from convnet.modeldir import resolve_version

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CIFAR_TEST = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "test.tar.gz"
BENTO_VENV = BENCH / ".venv-bento"
BENTO_REQUIREMENTS = ["bentoml>=1.4,<1.5", f"onnxruntime=={ort.__version__}", "pillow", "numpy"]
READY_TIMEOUT = 180  # seconds for a server to start (TensorFlow and BentoML import slowly)
INSTALL_TIMEOUT = 900  # seconds for creating the BentoML venv
SAMPLE_IMAGES = 256  # distinct CIFAR test images cycled through
LARGE_SIDE = 512  # pixels: the "photo" variant
LARGE_IMAGES = 64  # distinct 512x512 images (each about 40 kB)
CEILING_BATCH = 64  # images per ONNX Runtime call for the ceiling
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # per CPU second


@dataclass
class Target:
    name: str
    description: str
    path: str  # the predict route
    field: str  # multipart field name for images
    ready_path: str  # GET answers 200 once the model is loaded
    command: list[str] | None = None  # None: a server that is already running (--url)
    env: dict = field(default_factory=dict)
    port: int = 0
    host: str = "127.0.0.1"


def load_images(count: int) -> list[bytes]:
    """`count` CIFAR-10 test JPEGs, spread over the classes (read from the shared archive)."""
    if not CIFAR_TEST.is_file():
        raise SystemExit(f"{CIFAR_TEST} not found: the benchmark needs the CIFAR-10 test JPEGs")
    with tarfile.open(CIFAR_TEST) as archive:
        blobs = [archive.extractfile(m).read() for m in archive
                 if m.isfile() and m.name.endswith(".jpg")]
    return [blobs[i] for i in np.linspace(0, len(blobs) - 1, count).astype(int)]


def upscale(jpeg: bytes, side: int = LARGE_SIDE) -> bytes:
    """A 32x32 JPEG as a `side` x `side` photo-sized JPEG (bicubic, quality 90)."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((side, side), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def ort_images_per_s(model_path: str, pixels: np.ndarray, threads: int, seconds: float) -> float:
    """Images/s of one ONNX Runtime session (`threads` intra-op threads, 0 = ORT's default)
    running `pixels` as one batch again and again for `seconds`."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model_path, sess_options=options,
                                   providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: pixels}
    for _ in range(3):
        session.run(None, feed)
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        session.run(None, feed)
        runs += 1
    return runs * len(pixels) / elapsed


def measure_ceiling(version_dir: Path, images: list[bytes], seconds: float) -> dict:
    """ONNX Runtime alone on batches of 64 decoded images: in one process with one intra-op
    thread and with ORT's default (one per core), the better being the ceiling; and, for
    reference, one single-threaded process per core at once (what the machine can compute)."""
    pixels = np.stack([decode_image(blob) for blob in images])
    batch = np.resize(pixels, (CEILING_BATCH, *pixels.shape[1:]))
    model_path = str(version_dir / "model.onnx")
    cores = os.cpu_count() or 1
    by_threads = {"1 thread": ort_images_per_s(model_path, batch, 1, seconds / 3),
                  f"{cores} threads": ort_images_per_s(model_path, batch, 0, seconds / 3)}
    best = max(by_threads, key=by_threads.get)
    spawn = multiprocessing.get_context("spawn")  # fresh processes: no ORT state across a fork
    with ProcessPoolExecutor(cores, mp_context=spawn) as pool:
        per_process = list(pool.map(ort_images_per_s, [model_path] * cores, [batch] * cores,
                                    [1] * cores, [seconds / 3] * cores))
    return {"batch": CEILING_BATCH, "images_per_s": by_threads[best], "threads": best,
            "ms_per_batch": 1000 * CEILING_BATCH / by_threads[best],
            "by_threads": {name: round(value, 1) for name, value in by_threads.items()},
            "processes": cores, "all_processes_images_per_s": round(sum(per_process), 1)}


def ensure_bento_venv() -> Path:
    """bench/.venv-bento with BentoML, made on first use; returns its `bentoml` executable."""
    exe = BENTO_VENV / "bin" / "bentoml"
    if not exe.exists():
        print(f"creating {BENTO_VENV} (BentoML and its dependencies, once)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENTO_VENV)], check=True)
        subprocess.run([str(BENTO_VENV / "bin" / "pip"), "install", "--quiet",
                        *BENTO_REQUIREMENTS], check=True, timeout=INSTALL_TIMEOUT)
    return exe


def bento_version() -> str | None:
    pip = BENTO_VENV / "bin" / "pip"
    if not pip.exists():
        return None
    out = subprocess.run([str(pip), "show", "bentoml"], capture_output=True, text=True).stdout
    match = re.search(r"^Version: (\S+)", out, re.M)
    return match.group(1) if match else None


def make_targets(args, version_dir: Path, log_dir: Path) -> list[Target]:
    targets = []
    for name in args.targets:
        port = free_port()
        if name in ("convnet", "convnet-int8"):
            if name == "convnet-int8" and not (version_dir / "model.int8.onnx").is_file():
                print(f"skipping convnet-int8: no model.int8.onnx in {version_dir}",
                      file=sys.stderr)
                continue
            settings = {"BATCH_MAX_SIZE": args.batch_max_size,
                        "BATCH_MAX_DELAY_MS": args.batch_delay_ms,
                        "INFERENCE_THREADS": args.inference_threads}
            env = {f"CONVNET_{k}": str(v) for k, v in settings.items() if v is not None}
            command = [sys.executable, "-m", "convnet", "serve", "--model", str(args.model_root),
                       "--port", str(port)]
            for flag in ("workers", "threads"):
                if getattr(args, flag) is not None:
                    command += [f"--{flag}", str(getattr(args, flag))]
            description = describe_convnet(args)
            if name == "convnet-int8":
                command += ["--precision", "int8"]
                description += " (--precision int8: model.int8.onnx)"
            else:  # the float model, whatever the server's default picks
                command += ["--precision", "float"]
            targets.append(Target(name, description, "/api/v1/predict",
                                  "file", "/readyz", command, env, port))
        elif name == "baseline":
            keras_dir = resolve_version(args.keras) if args.keras else version_dir
            if not (keras_dir / "model.keras").is_file():
                print(f"skipping baseline: no model.keras in {keras_dir} (see --keras)",
                      file=sys.stderr)
                continue
            command = [sys.executable, str(BENCH / "baseline_server.py"), str(keras_dir),
                       "--port", str(port)]
            targets.append(Target("baseline", "bench/baseline_server.py: Flask dev server, Keras "
                                  f"model.predict per request ({keras_dir / 'model.keras'})",
                                  "/predict", "file", "/healthz", command, {}, port))
        elif name == "bentoml":
            exe = ensure_bento_venv()
            command = [str(exe), "serve", "bento_service:Classifier", "--working-dir", str(BENCH),
                       "--host", "127.0.0.1", "--port", str(port)]
            env = {"BENCH_MODEL_DIR": str(version_dir), "BENTOML_DO_NOT_TRACK": "true",
                   "BENTOML_HOME": str(log_dir / "bentoml-home"),
                   "BENCH_BENTO_WORKERS": str(args.bento_workers)}
            targets.append(Target("bentoml", f"bench/bento_service.py: BentoML {bento_version()}, "
                                  f"{args.bento_workers} workers, adaptive batching (up to 64 "
                                  "images), 1 ONNX Runtime thread per worker", "/predict",
                                  "images", "/readyz", command, env, port))
    if args.url:
        match = re.fullmatch(r"http://([^/:]+):(\d+)/?", args.url)
        if not match:
            raise SystemExit("--url must look like http://HOST:PORT")
        targets.append(Target("url", f"{args.url} (started elsewhere)", "/api/v1/predict", "file",
                              "/readyz", host=match.group(1), port=int(match.group(2))))
    return targets


def describe_convnet(args) -> str:
    """Our server's effective settings: the options given, else its defaults."""
    from convnet.serve import DEFAULTS
    from convnet.serve.server import run

    defaults = inspect.signature(run).parameters
    workers = args.workers or defaults["workers"].default
    threads = args.threads or defaults["threads"].default
    size = args.batch_max_size or DEFAULTS["BATCH_MAX_SIZE"]
    delay = args.batch_delay_ms if args.batch_delay_ms is not None else \
        DEFAULTS["BATCH_MAX_DELAY_MS"]
    ort_threads = args.inference_threads or DEFAULTS["INFERENCE_THREADS"]
    return (f"`convnet serve` (gunicorn): {workers} workers x {threads} threads, micro-batches "
            f"of up to {size} images waiting at most {delay:g} ms, {ort_threads} ONNX Runtime "
            f"thread(s) per worker, model {args.model_root}")


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) that process `pid` and all its descendants have used so far,
    from Linux's /proc (0 elsewhere); a process that ends meanwhile drops out of the sum."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (of all its threads)
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
    return total / CLOCK_TICKS


def http_get(target: Target, path: str, timeout: float = 5) -> tuple[int, bytes]:
    url = f"http://{target.host}:{target.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@contextlib.contextmanager
def running(target: Target, log_dir: Path):
    """Start the target's server (in its own process group), wait until ready, stop it after."""
    process = None
    log_path = log_dir / f"{target.name}.log"
    if target.command:
        with open(log_path, "wb") as log:
            process = subprocess.Popen(target.command, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, **target.env}, cwd=REPO,
                                       start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if process is not None and process.poll() is not None:
                raise SystemExit(f"{target.name} exited during start-up:\n"
                                 f"{log_path.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(OSError):
                if http_get(target, target.ready_path, timeout=2)[0] == 200 \
                        and all_workers_accept(target):
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{target.name} not ready after {READY_TIMEOUT} s")
            time.sleep(0.5)
        yield process
    finally:
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def all_workers_accept(target: Target) -> bool:
    """Whether every worker of our server has reached its accept loop. Its /readyz answers as
    soon as the first one has loaded the model, and connections opened before the others accept
    all stay with that one (kept alive): a row would measure one worker."""
    if target.name not in ("convnet", "convnet-int8", "url"):
        return True
    _, text = http_get(target, "/metrics", timeout=2)
    return all(value == b"1.0" for value in
               re.findall(rb"^convnet_worker_accepting\{[^}]*\} (\S+)$", text, re.M))


def batch_stats(target: Target) -> tuple[float, float] | None:
    """(sum, count) of our images-per-inference-call histogram, from /metrics."""
    if target.name not in ("convnet", "convnet-int8", "url"):
        return None
    with contextlib.suppress(OSError):
        _, text = http_get(target, "/metrics")
        found = dict(re.findall(rb"^convnet_inference_batch_images_(sum|count) (\S+)$", text,
                                re.M))
        if len(found) == 2:
            return float(found[b"sum"]), float(found[b"count"])
    return None


def run_target(target: Target, args, image_sets: dict[str, list[bytes]],
               process: subprocess.Popen | None = None) -> list[dict]:
    rows = []
    server_cpu = (lambda: process_tree_cpu(process.pid)) if process is not None else None
    per = args.images_per_request
    for size, images in image_sets.items():
        groups = [images[i : i + per] for i in range(0, len(images) - per + 1, per)]
        payloads = [multipart_request(target.host, target.port, target.path, target.field, g)
                    for g in groups]
        for concurrency in args.concurrency:
            before = batch_stats(target)
            phase = asyncio.run(run_phase(target.host, target.port, payloads,
                                          concurrency=concurrency, duration=args.duration,
                                          warmup=args.warmup, images_per_request=per,
                                          server_cpu=server_cpu))
            after = batch_stats(target)
            row = {"target": target.name, "images": size, **phase.summary()}
            if before and after and after[1] > before[1]:
                row["mean_batch"] = (after[0] - before[0]) / (after[1] - before[1])
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


TABLE_HEAD = ("| server | images | concurrency | requests/s | images/s | p50 ms | p95 ms | "
              "p99 ms | errors | images per inference call | server CPU ms/request | "
              "client CPU % |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def format_row(row: dict) -> str:
    batch = f"{row['mean_batch']:.1f}" if "mean_batch" in row else "-"
    server = row.get("server_cpu_ms_per_request")
    return (f"| {row['target']} | {row['images']} | {row['concurrency']} | "
            f"{row['requests_per_s']:.1f} | {row['images_per_s']:.1f} | {row['p50_ms']:.1f} | "
            f"{row['p95_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} | {batch} | "
            f"{'-' if server is None else f'{server:.2f}'} | {row['client_cpu_percent']:.0f} |")


def median_rows(runs: list[dict]) -> list[dict]:
    """One row per (server, images, concurrency): the round with the median requests/s (a
    whole round, so its latencies and errors stay those of the same run)."""
    groups: dict[tuple, list[dict]] = {}
    for row in runs:
        groups.setdefault((row["target"], row["images"], row["concurrency"]), []).append(row)
    rows = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["requests_per_s"])
        rows.append({**ranked[(len(ranked) - 1) // 2], "rounds": len(group),
                     "requests_per_s_all": [round(r["requests_per_s"], 1) for r in group]})
    return rows


def find(rows, target, images, concurrency) -> dict | None:
    return next((r for r in rows if (r["target"], r["images"], r["concurrency"])
                 == (target, images, concurrency)), None)


def check_targets(rows: list[dict], ceiling: dict | None) -> list[str]:
    """The issue's goals, each as a line with the measured value and PASS/FAIL."""
    lines = []
    top = max((r["concurrency"] for r in rows), default=0)
    ours = find(rows, "convnet", "32x32", top)
    if ours is None:
        return lines

    def line(goal, value, passed):
        lines.append(f"- {goal}: {value} -> {'PASS' if passed else 'FAIL'}")

    for other, goal in (("baseline", 20.0), ("bentoml", 1.0)):
        theirs = find(rows, other, "32x32", top)
        if theirs:
            ratio = ours["requests_per_s"] / max(theirs["requests_per_s"], 1e-9)
            line(f"requests/s vs {other} at concurrency {top}, 32x32 (goal >= {goal:g}x)",
                 f"{ratio:.2f}x", ratio >= goal)
    if ceiling:
        share = ours["images_per_s"] / ceiling["images_per_s"]
        line(f"float images/s vs the ONNX ceiling at concurrency {top}, 32x32 (goal >= 70%)",
             f"{100 * share:.0f}%", share >= 0.7)
    for size in ("32x32", "512x512"):
        mid = find(rows, "convnet", size, 8)
        if mid:
            line(f"p99 at concurrency 8, {size} (goal <= 50 ms)", f"{mid['p99_ms']:.1f} ms",
                 mid["p99_ms"] <= 50)
    return lines


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return (f"{cpu}, {os.cpu_count()} CPUs, {mem / 2**20:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"onnxruntime {ort.__version__}")


def write_report(out: Path, args, targets, version_dir, ceiling, rows, checks, runs) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", *(sys.argv if sys.argv[0] else ["bench/serve_load.py"])])
    lines = [
        "# Serving under load", "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- model: {version_dir}",
        f"- load: {args.duration:g} s per row after {args.warmup:g} s warm-up, closed loop "
        f"(each connection keeps one request in flight, HTTP/1.1 keep-alive), "
        f"{args.images_per_request} image(s) per multipart request, a random boundary each; "
        f"{args.rounds} round(s) of every server, interleaved, each row the median round by "
        "requests/s",
        "- server CPU ms/request: CPU time (user + system) of the server's processes during the "
        "row, per request answered; unlike requests/s it holds when other jobs share the machine",
        "- client CPU %: the load generator's own CPU use (it shares the machine)",
        "", "Servers:", *(f"- {t.name}: {t.description}" for t in targets), "",
    ]
    if ceiling:
        tried = ", ".join(f"{k}: {v:.0f}" for k, v in ceiling["by_threads"].items())
        lines += [f"ONNX ceiling: {ceiling['images_per_s']:.0f} images/s "
                  f"(ONNX Runtime alone in one process, batches of {ceiling['batch']} decoded "
                  f"images, {ceiling['ms_per_batch']:.1f} ms each, the best of {tried} "
                  "images/s; no HTTP, no decoding). For reference, "
                  f"{ceiling['processes']} single-threaded processes at once: "
                  f"{ceiling['all_processes_images_per_s']:.0f} images/s in all. Measured "
                  f"before and after the servers ({ceiling['before']:.0f} and "
                  f"{ceiling['after']:.0f} images/s); the higher is used.", ""]
    lines += [TABLE_HEAD, *(format_row(r) for r in rows), ""]
    if checks:
        lines += ["Goals:", *checks, ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "machine": machine(), "model": str(version_dir),
         "servers": {t.name: t.description for t in targets}, "ceiling": ceiling,
         "rows": rows, "goals": checks, "all_rounds": runs}, indent=2))
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", dest="model_root", default=None,
                        help="model root or version folder (default: the bundled model)")
    parser.add_argument("--targets", default=None,
                        help="comma-separated: onnx,convnet,convnet-int8,baseline,bentoml "
                             "(default: all, or none with --url)")
    parser.add_argument("--url", help="also (or only) load this running server: http://HOST:PORT")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per row")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each row")
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated")
    parser.add_argument("--sizes", default="32,512", help="image sides: 32 (CIFAR), 512 (upscaled)")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--workers", type=int, help="convnet: gunicorn workers (default: ours)")
    parser.add_argument("--threads", type=int, help="convnet: threads per worker")
    parser.add_argument("--batch-max-size", type=int, help="convnet: images per inference call")
    parser.add_argument("--batch-delay-ms", type=float, help="convnet: max batching delay")
    parser.add_argument("--inference-threads", type=int, help="convnet: ORT threads per worker")
    parser.add_argument("--bento-workers", type=int, default=2, help="BentoML worker processes")
    parser.add_argument("--keras", help="version folder (or root) with the model.keras the "
                                        "baseline serves (default: --model's; the bundled model "
                                        "ships ONNX only)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="run every server this many times, interleaved; each row is the "
                             "median round (this machine's speed drifts)")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "serve_load",
                        help="report path without suffix (.md and .json are written)")
    args = parser.parse_args(argv)
    default = "" if args.url else "onnx,convnet,convnet-int8,baseline,bentoml"
    args.targets = [t for t in (args.targets if args.targets is not None else default).split(",")
                    if t]
    unknown = set(args.targets) - {"onnx", "convnet", "convnet-int8", "baseline", "bentoml"}
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    version_dir = resolve_version(args.model_root)
    if args.model_root is None:
        args.model_root = version_dir.parent
    images = load_images(SAMPLE_IMAGES)
    image_sets = {}
    for side in args.sizes:
        image_sets[f"{side}x{side}"] = (
            images if side == 32 else [upscale(b, side) for b in images[:LARGE_IMAGES]])
    print(f"machine: {machine()}\nmodel: {version_dir}\n", flush=True)

    ceiling = None
    if "onnx" in args.targets:
        ceiling = measure_ceiling(version_dir, images, seconds=min(2 * args.duration, 20))
        print(f"ONNX ceiling: {ceiling['images_per_s']:.0f} images/s ({ceiling['threads']}); "
              f"{ceiling['processes']} processes: {ceiling['all_processes_images_per_s']:.0f}\n",
              flush=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="convnet-load-") as tmp:
        targets = make_targets(args, version_dir, Path(tmp))
        print(TABLE_HEAD, flush=True)
        for round_number in range(1, args.rounds + 1):
            for target in targets:
                with running(target, Path(tmp)) as process:
                    runs += [{**row, "round": round_number}
                             for row in run_target(target, args, image_sets, process)]
    rows = median_rows(runs)
    if args.rounds > 1:
        print(f"\nmedian of {args.rounds} rounds:\n{TABLE_HEAD}\n"
              + "\n".join(format_row(r) for r in rows), flush=True)
    if ceiling:  # again: this machine's speed drifts, and the goal must hold for the higher one
        after = measure_ceiling(version_dir, images, seconds=min(2 * args.duration, 20))
        print(f"ONNX ceiling after the servers: {after['images_per_s']:.0f} images/s", flush=True)
        ceiling["before"], ceiling["after"] = ceiling["images_per_s"], after["images_per_s"]
        ceiling = {**ceiling, **(after if after["images_per_s"] > ceiling["images_per_s"] else {})}
    checks = check_targets(rows, ceiling)
    print("\n".join(checks))
    write_report(args.out, args, targets, version_dir, ceiling, rows, checks, runs)


if __name__ == "__main__":
    main()
