"""The test images a model got most confidently wrong, stored in its version folder.

`write_mistakes` keeps the k wrong answers with the highest predicted probability in one file,
`mistakes.json`, each with its thumbnail as a base64 PNG, so the file is written atomically like
every other file of a version and the model page (`GET /models/<name>`) can show it without a
second file or route. `convnet evaluate --out-mistakes DIR` writes it; training's publish step
may call it on the staging folder. A version without the file (the bundled model, older versions)
simply has no such section.

    {"k": 24, "num_images": 5000, "num_wrong": 445, "source": "...", "tta": true,
     "mistakes": [{"index": 412, "true": "cat", "predicted": "dog", "probability": 0.97,
                   "true_probability": 0.01, "thumbnail": "<base64 PNG>"}, ...]}
"""

from __future__ import annotations

import base64
import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from convnet import modeldir

log = logging.getLogger(__name__)

MISTAKES_FILE = "mistakes.json"
DEFAULT_K = 24  # mistakes kept: three rows of eight thumbnails on a wide screen
THUMBNAIL_MAX = 96  # pixels per side; larger inputs are shrunk to this, smaller kept as they are


def most_confident_mistakes(labels: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of up to k images whose predicted class is wrong, most probable answer first
    (ties by index)."""
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probs[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:k]]


def thumbnail_b64(image: np.ndarray) -> str:
    """uint8 (S, S, 3) -> base64 PNG, at most THUMBNAIL_MAX pixels per side."""
    picture = Image.fromarray(image)
    if max(picture.size) > THUMBNAIL_MAX:
        picture.thumbnail((THUMBNAIL_MAX, THUMBNAIL_MAX), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def write_mistakes(version_dir: str | os.PathLike, images: np.ndarray, labels: np.ndarray,
                   probs: np.ndarray, k: int = DEFAULT_K, *, classes: list[str] | None = None,
                   source: str | None = None, tta: bool | None = None) -> Path:
    """Write `version_dir/mistakes.json` and return its path.

    images: uint8 (N, S, S, 3) test images; labels: (N,) true class indices; probs: (N, C) the
    model's probabilities for them; classes: the class names (default: version_dir's
    labels.json); source, tta: what the images were and how they were scored, for the record.
    """
    version_dir = Path(version_dir)
    classes = classes if classes is not None else modeldir.load_labels(version_dir)
    labels, probs = np.asarray(labels), np.asarray(probs)
    if not (len(images) == len(labels) == len(probs)) or probs.shape[1] != len(classes):
        raise ValueError(f"{len(images)} images, {len(labels)} labels and probabilities of shape "
                         f"{list(probs.shape)} do not match {len(classes)} classes")
    chosen = most_confident_mistakes(labels, probs, k)
    predicted = probs.argmax(1)
    entries = [{
        "index": int(i),
        "true": classes[labels[i]], "true_index": int(labels[i]),
        "predicted": classes[predicted[i]], "predicted_index": int(predicted[i]),
        "probability": round(float(probs[i, predicted[i]]), 4),
        "true_probability": round(float(probs[i, labels[i]]), 4),
        "thumbnail": thumbnail_b64(images[i]),
    } for i in chosen]
    path = version_dir / MISTAKES_FILE
    modeldir.write_json_atomic(path, {
        "k": k, "num_images": int(len(labels)), "num_wrong": int((predicted != labels).sum()),
        "source": source, "tta": tta, "mistakes": entries,
    })
    return path


def read_mistakes(version_dir: str | os.PathLike) -> dict | None:
    """The parsed file, or None if absent or unusable (logged: a damaged optional file must
    not break the page that shows it). Entries without the fields the page needs are dropped."""
    path = Path(version_dir) / MISTAKES_FILE
    if not path.is_file():
        return None
    try:
        record = modeldir.read_json(path)
    except (modeldir.ModelDirError, OSError, UnicodeDecodeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    if not isinstance(record, dict) or not isinstance(record.get("mistakes"), list):
        log.warning("ignoring %s: expected an object with a list of mistakes", path)
        return None
    needed: dict[str, type | tuple[type, ...]] = {
        "true": str, "predicted": str, "probability": (int, float), "thumbnail": str}
    record["mistakes"] = [m for m in record["mistakes"] if isinstance(m, dict) and all(
        isinstance(m.get(key), kind) for key, kind in needed.items())]
    return record
