"""Step 3 of serving: probabilities (N, C) + labels -> the JSON every door answers with."""

from __future__ import annotations

import numpy as np

from convnet.serve.errors import ApiError

DEFAULT_TOP_K = 5


def parse_top_k(value: str | None, num_classes: int) -> int:
    """The `top_k` query parameter: an integer 1..C, default 5 (or C if fewer classes)."""
    if value is None or value == "":
        return min(DEFAULT_TOP_K, num_classes)
    try:
        k = int(value)
    except ValueError:
        k = 0
    if not 1 <= k <= num_classes:
        raise ApiError(f"top_k must be an integer from 1 to {num_classes}, got {value!r}")
    return k


def top_k(row: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """The k most probable classes of one image, most probable first (ties by class index)."""
    order = np.argsort(-row, kind="stable")[:k]
    return [
        {"label": labels[i], "index": int(i), "probability": float(row[i])} for i in order
    ]


def predictions(probs: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """One entry per image, in request order."""
    out = []
    for row in probs:
        best = top_k(row, labels, k)
        out.append({"label": best[0]["label"], "probability": best[0]["probability"],
                    "top_k": best})
    return out
