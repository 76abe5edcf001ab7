"""`explain=1`: per image, which pixels drove the top answer (an occlusion map, convnet.explain),
as a small array and as a PNG overlay on the image the model saw.

An explanation costs (GRID - PATCH + 1)^2 = 49 extra model runs per image, so a request may ask
for it on at most MAX_EXPLAIN_IMAGES images (400 beyond, checked before any image is decoded).
The blanked copies run in one call on the request's own thread, straight on the model's ONNX
Runtime session (thread-safe), not through the micro-batcher: 49 copies of one request would
only crowd other requests' batches. Requests without `explain` take none of this path.
"""

from __future__ import annotations

import base64

import numpy as np
from flask import current_app

from convnet import explain
from convnet.serve.errors import ApiError
from convnet.serve.model import LoadedModel

METHOD = "occlusion"
EXPLAIN_RUNS = (explain.GRID - explain.PATCH + 1) ** 2  # extra model runs per explained image
TRUE_VALUES, FALSE_VALUES = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def parse_explain(value: str | None) -> bool:
    """The `explain` query parameter (or form field): 1/true/yes/on, or 0/false/no/off/absent."""
    text = (value or "").strip().lower()
    if text in TRUE_VALUES:
        return True
    if text in FALSE_VALUES:
        return False
    raise ApiError(f"explain must be 1 or 0 (true or false), got {value!r}")


def max_explain_images() -> int:
    return current_app.config["MAX_EXPLAIN_IMAGES"]


def check_explain_count(count: int) -> None:
    limit = max_explain_images()
    if count > limit:
        raise ApiError(f"explain=1 takes at most {limit} images per request (each costs "
                       f"{EXPLAIN_RUNS} extra model runs); this one has {count}: send them in "
                       "several requests, or without explain")


def png_b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


def explanations(model: LoadedModel, pixels: np.ndarray, probs: np.ndarray) -> list[dict]:
    """Per image, the explanation of its top class: pixels uint8 (N, S, S, 3) as the model saw
    them, probs (N, C) its answers."""
    targets = probs.argmax(1)
    maps = explain.occlusion_maps(lambda x: model.split(model.predict(x))[0], pixels, targets,
                                  probs)  # (N, G, G)
    return [{
        "method": METHOD,
        "label": model.labels[target], "index": int(target),
        "grid": explain.GRID,
        "heatmap": np.round(heat, 4).tolist(),
        "overlay_png": png_b64(explain.overlay_png(image, heat)),
    } for image, heat, target in zip(pixels, maps, targets, strict=True)]
