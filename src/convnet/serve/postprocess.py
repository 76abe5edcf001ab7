"""Step 3 of serving: probabilities (N, C) + labels -> the JSON every door answers with."""

from __future__ import annotations

import numpy as np

from convnet.calibration import UnsureRule
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


def unsure_fields(count: int, scores: np.ndarray | None, rule: UnsureRule | None) -> list[dict]:
    """Per image (`count` of them) `{"unsure": bool, "confidence": 0..1}` by the model's unsure
    rule (see convnet.calibration), or `{}` each for a model without one."""
    if rule is None or scores is None:
        return [{} for _ in range(count)]
    confidence, unsure = rule.confidence(scores), rule.unsure(scores)
    return [{"unsure": bool(u), "confidence": round(float(c), 4)}
            for u, c in zip(unsure, confidence, strict=True)]


def predictions(probs: np.ndarray, labels: list[str], k: int,
                scores: np.ndarray | None = None, rule: UnsureRule | None = None) -> list[dict]:
    """One entry per image, in request order; with an unsure rule, each also says whether the
    image looks unlike anything the model was trained on."""
    extra = unsure_fields(len(probs), scores, rule)
    out = []
    for row, fields in zip(probs, extra, strict=True):
        best = top_k(row, labels, k)
        out.append({"label": best[0]["label"], "probability": best[0]["probability"],
                    **fields, "top_k": best})
    return out
