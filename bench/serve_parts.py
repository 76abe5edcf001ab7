"""Where a serving request's CPU goes, part by part, in one process: prints three tables.

    python bench/serve_parts.py [--model MODEL_DIR] [--bodies 3000]

1. ONNX Runtime on one thread, by batch size: how much micro-batching can buy.
2. Parsing one multipart upload (an 833-byte-class CIFAR-sized JPEG, a random boundary per body,
   as browsers and HTTP libraries send): Werkzeug's form parser against the `multipart` package's
   push parser that convnet.serve.uploads uses.
3. The Flask app alone: POST /api/v1/predict with such an upload, through the app's WSGI callable
   (no HTTP server), its inference replaced by a stored answer: what a request costs in Python
   besides ONNX Runtime and gunicorn (routing, hooks, parsing, decoding, JSON, metrics, access log).
"""

from __future__ import annotations

import argparse
import io
import os
import time
import uuid
from pathlib import Path

import multipart
import numpy as np
import onnxruntime as ort
from PIL import Image
from werkzeug.formparser import MultiPartParser
from werkzeug.test import EnvironBuilder

from convnet.imaging import decode_image
from convnet.modeldir import resolve_version
from convnet.serve import create_app


def onnx_table(version_dir: Path) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(version_dir / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    print("| batch | ms per call | images/s (1 thread) |\n| ---: | ---: | ---: |")
    for batch in (1, 2, 4, 8, 16, 64):
        feed = {name: images[:batch]}
        session.run(None, feed)
        calls = max(400 // batch, 6)
        started = time.perf_counter()
        for _ in range(calls):
            session.run(None, feed)
        seconds = (time.perf_counter() - started) / calls
        print(f"| {batch} | {seconds * 1e3:.2f} | {batch / seconds:.0f} |")


def bodies(count: int) -> list[tuple[str, bytes, bytes]]:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "JPEG")
    jpeg, out = buffer.getvalue(), []
    for _ in range(count):
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="x.jpg"\r\nContent-Type: image/jpeg\r\n\r\n').encode()
        out.append((boundary, body + jpeg + f"\r\n--{boundary}--\r\n".encode(), jpeg))
    return out


def with_werkzeug(boundary: str, body: bytes) -> bytes:
    _, files = MultiPartParser().parse(io.BytesIO(body), boundary.encode(), len(body))
    return files["file"].read()


def with_multipart(boundary: str, body: bytes) -> bytes:
    chunks = []
    with multipart.PushMultipartParser(boundary, len(body)) as parser:
        chunks = [event for event in parser.parse(body) if isinstance(event, bytes)]
    return b"".join(chunks)


def multipart_table(count: int) -> None:
    samples = bodies(count)
    print(f"\n| parser | us per body ({len(samples[0][1])} bytes, random boundary) |\n"
          "| --- | ---: |")
    for name, parse in (("werkzeug", with_werkzeug), ("multipart", with_multipart)):
        assert parse(*samples[0][:2]) == samples[0][2], name
        started = time.perf_counter()
        for boundary, body, _ in samples:
            parse(boundary, body)
        print(f"| {name} | {(time.perf_counter() - started) / count * 1e6:.1f} |")


def app_table(version_dir: Path, count: int) -> None:
    samples = bodies(count)
    app = create_app({"MODEL_DIR": str(version_dir), "RELOAD_INTERVAL": 0, "PRECISION": "float",
                      "BATCH_MAX_SIZE": 1,  # no batching thread: one thread does everything
                      "ACCESS_LOG": os.devnull, "FEEDBACK_DB": ""})
    model = app.extensions["convnet.registry"].served.default.current
    answer = model.predict(decode_image(samples[0][2], size=model.input_size)[None])  # (1, C+)
    app.extensions["convnet.batchers"].make_infer = (
        lambda _: lambda pixels: np.repeat(answer, len(pixels), axis=0))
    environs = [EnvironBuilder(path="/api/v1/predict", method="POST", data=body,
                               content_type=f"multipart/form-data; boundary={boundary}",
                               headers={"Accept": "application/json"}).get_environ()
                for boundary, body, _ in samples]

    def start_response(status, headers, exc_info=None):
        assert status.startswith("200"), status

    def run_all() -> float:
        started = time.process_time()
        for environ in environs:
            b"".join(app(dict(environ, **{"wsgi.input": io.BytesIO(environ["wsgi.input"]
                                                                   .getvalue())}),
                         start_response))
        return (time.process_time() - started) / count

    def decode_all() -> float:
        started = time.process_time()
        for _, _, jpeg in samples:
            decode_image(jpeg, size=model.input_size)
        return (time.process_time() - started) / count

    run_all()  # warm-up
    whole, decoding = min(run_all() for _ in range(3)), min(decode_all() for _ in range(3))
    print(f"\n| Flask app, per request ({count} requests, best of 3, CPU time) | us |\n"
          "| --- | ---: |\n"
          f"| POST /api/v1/predict, one multipart JPEG in, JSON out, inference stubbed | "
          f"{whole * 1e6:.0f} |\n| of which decode_image (32x32 JPEG) | {decoding * 1e6:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="model root or version folder (default: the bundled model)")
    parser.add_argument("--bodies", type=int, default=3000)
    args = parser.parse_args()
    version_dir = resolve_version(args.model)
    onnx_table(version_dir)
    multipart_table(args.bodies)
    app_table(version_dir, args.bodies)


if __name__ == "__main__":
    main()
