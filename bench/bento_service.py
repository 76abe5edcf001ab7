"""The comparison point for bench/serve_load.py: the same ONNX model served by BentoML 1.4 with
adaptive batching on. Runs only in bench/.venv-bento (made by serve_load.py), never in ours.

    BENCH_MODEL_DIR=runs/cifar10/1 bench/.venv-bento/bin/bentoml serve bento_service:Classifier \
        --working-dir bench --port 3000

POST /predict takes multipart `images` fields (one or many) and answers one
{"label", "probability"} per image. Preprocessing matches convnet.imaging (JPEG draft decoding,
centre crop, Lanczos resize to 32x32), so the two servers do the same work per image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

SIZE = 32  # model input side, pixels
MODEL_DIR = Path(os.environ.get("BENCH_MODEL_DIR", "."))  # one version folder
WORKERS = int(os.environ.get("BENCH_BENTO_WORKERS", "2"))  # processes; one per core here
ORT_THREADS = int(os.environ.get("BENCH_ORT_THREADS", "1"))  # intra-op threads per worker
MAX_BATCH = int(os.environ.get("BENCH_MAX_BATCH", "64"))  # images per inference call
MAX_LATENCY_MS = int(os.environ.get("BENCH_MAX_LATENCY_MS", "10000"))  # beyond: 503


def to_pixels(image: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 (32, 32, 3)."""
    if image.format == "JPEG":
        image.draft("RGB", (SIZE * 2, SIZE * 2))
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = ImageOps.fit(image, (SIZE, SIZE), method=Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


@bentoml.service(workers=WORKERS, traffic={"timeout": 60})
class Classifier:
    def __init__(self):
        options = ort.SessionOptions()
        options.intra_op_num_threads = ORT_THREADS
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(MODEL_DIR / "model.onnx"), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.labels = json.loads((MODEL_DIR / "labels.json").read_text())

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, images: list[Image.Image]) -> list[dict]:
        pixels = np.stack([to_pixels(image) for image in images])  # (N, 32, 32, 3) uint8
        probs = self.session.run(None, {self.input_name: pixels})[0]
        best = probs.argmax(axis=1)
        return [{"label": self.labels[k], "probability": float(row[k])}
                for row, k in zip(probs, best, strict=True)]
