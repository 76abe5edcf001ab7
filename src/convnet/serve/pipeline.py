"""Step 2 of serving, shared by every blueprint: find the served model, run it, count it.

Inference goes through the worker's micro-batcher (convnet.serve.batching): `get_model` on a POST
announces that an image is on its way, so a batch forming meanwhile may wait for it, and `infer`
submits the decoded pixels and waits for this request's rows of the batched answer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from flask import current_app, g, request

from convnet.serve.batching import ModelBatchers
from convnet.serve.errors import ApiError
from convnet.serve.holder import ModelHolder
from convnet.serve.metrics import ServeMetrics
from convnet.serve.model import LoadedModel

if TYPE_CHECKING:  # decode imports this module
    from convnet.serve.decode import DecodeBudget


def holder() -> ModelHolder:
    return current_app.extensions["convnet.holder"]


def metrics() -> ServeMetrics:
    return current_app.extensions["convnet.metrics"]


def batchers() -> ModelBatchers:
    return current_app.extensions["convnet.batchers"]


def decode_budget() -> DecodeBudget:
    return current_app.extensions["convnet.decode_budget"]


def get_model(name: str | None = None, version: int | None = None) -> LoadedModel:
    """The model serving now; 404 if `name`/`version` ask for another, 503 while none loads.

    Callers keep the returned object for the whole request: a hot swap meanwhile is harmless.
    """
    model = holder().current
    if model is None:
        raise ApiError(f"no model is loaded: {holder().load_error}", 503)
    if name is not None and name != model.name:
        raise ApiError(f"model {name!r} not found; this server serves {model.name!r}", 404)
    if version is not None and version != model.version:
        refusal = holder().refusals.get(version)
        detail = f" (refused: {refusal.reason})" if refusal else ""
        raise ApiError(
            f"version {version} of model {model.name!r} is not served{detail}; "
            f"the served version is {model.version}",
            404,
        )
    g.convnet_served = model  # for the access log
    if request.method == "POST" and "convnet_arrival" not in g:
        # Every POST route that asks for the model runs it, after decoding its images.
        g.convnet_arrival = batchers().expect(model)
    return model


def infer(model: LoadedModel, pixels: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, C) float32 probabilities, computed in a batch shared with
    the worker's concurrent requests for the same model."""
    return infer_scored(model, pixels)[0]


def infer_scored(model: LoadedModel, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """As `infer`, plus each image's unsure score (None when the model has no unsure rule)."""
    g.convnet_images = g.get("convnet_images", 0) + len(pixels)  # for the access log
    return model.split(batchers().run(model, pixels, g.pop("convnet_arrival", None)))


def withdraw_arrival(exc: BaseException | None = None) -> None:
    """teardown_request: a request that announced an image but never ran it (e.g. it failed to
    decode) must not keep a batch waiting."""
    arrival = g.pop("convnet_arrival", None)
    if arrival is not None:
        arrival.withdraw()


def timed_predict(model: LoadedModel, m: ServeMetrics):
    """model.predict, recording the time and images of each call (each batch)."""

    def predict(pixels: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        probs = model.predict(pixels)
        m.inference_seconds.observe(time.perf_counter() - started)
        m.batch_images.observe(len(pixels))
        return probs

    return predict


def max_pixels() -> int:
    return current_app.config["MAX_IMAGE_PIXELS"]


def max_images() -> int:
    return current_app.config["MAX_IMAGES_PER_REQUEST"]


def max_parts() -> int:
    """Parts a multipart body may have in all: the images, a few other fields, and slack."""
    return 2 * max_images() + 16
