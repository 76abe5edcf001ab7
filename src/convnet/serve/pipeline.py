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
from convnet.serve.registry import ModelRegistry, Served

MODEL_HEADER, VERSION_HEADER = "X-Model-Name", "X-Model-Version"  # on every answer a model gave

if TYPE_CHECKING:  # decode imports this module
    from convnet.serve.decode import DecodeBudget


def registry() -> ModelRegistry:
    return current_app.extensions["convnet.registry"]


def holder() -> ModelHolder:
    """The default model's holder (the first of the config)."""
    return registry().served.default


def metrics() -> ServeMetrics:
    return current_app.extensions["convnet.metrics"]


def batchers() -> ModelBatchers:
    return current_app.extensions["convnet.batchers"]


def decode_budget() -> DecodeBudget:
    return current_app.extensions["convnet.decode_budget"]


def find_holder(name: str | None, served: Served | None = None) -> ModelHolder:
    """The holder of model `name` (None: the default model); 404 listing the served models."""
    served = served or registry().served
    if name is None:
        return served.default
    found = served.holders.get(name)
    if found is None:
        raise ApiError(f"model {name!r} not found; this server serves "
                       f"{', '.join(map(repr, served.names))}", 404,
                       extra={"models": served.names})
    return found


def get_model(name: str | None = None, version: int | None = None,
              label: str | None = None) -> LoadedModel:
    """Model `name` (None: the default one) at `version`, or at the version `label` names
    (neither: its newest); 404 for an unknown name, label or version, 503 while none loads.

    Callers keep the returned object for the whole request: a hot swap meanwhile is harmless.
    """
    served = registry().served
    found = find_holder(name, served)
    if label is not None:
        labels = served.labels(found.name or "")
        if label not in labels:
            raise ApiError(f"label {label!r} of model {found.name!r} not found; its labels are "
                           f"{', '.join(map(repr, labels)) or 'none'}", 404,
                           extra={"models": served.names, "labels": labels})
        version = labels[label]
    current = found.current
    if current is None:
        raise ApiError(f"no model is loaded: {found.load_error}", 503)
    model = current if version is None else found.loaded.get(version)
    if model is None:
        refusal = found.refusals.get(version) if version is not None else None
        detail = f" (refused: {refusal.reason})" if refusal else ""
        raise ApiError(
            f"version {version} of model {current.name!r} is not served{detail}; the served "
            f"versions are {', '.join(map(str, sorted(found.loaded)))}",
            404, extra={"versions": sorted(found.loaded)},
        )
    g.convnet_served = model  # for the access log and the X-Model-* headers
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


def name_model(response):
    """after_request: say which model and version answered, whatever the door."""
    model = g.get("convnet_served")
    if model is not None:
        response.headers[MODEL_HEADER] = model.name
        response.headers[VERSION_HEADER] = str(model.version)
    return response


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
