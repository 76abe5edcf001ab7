"""Operations: liveness, readiness, Prometheus metrics, the OpenAPI description, and the hooks
that count and time every request."""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, g, request

from convnet.serve.openapi import build_spec
from convnet.serve.pipeline import holder, metrics, registry
from convnet.serve.worker import STOPPING

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness: the process answers. Says nothing about the model (see /readyz)."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    """Readiness: 200 while the default model serves, 503 before; refused versions are listed
    either way, and every served model's loaded versions and labels. Names, versions and short
    reasons only: where the models live is the log's business."""
    h = holder()
    model = h.current
    served = registry().served
    body: dict = {
        "ready": model is not None,
        "refused": [{"version": r.version, "reason": r.reason, "at": r.at}
                    for r in sorted(h.refusals.values(), key=lambda r: r.version)],
        "models": [{"name": name, "versions": sorted(found.loaded),
                    "labels": served.labels(name),
                    "refused": sorted(found.refusals)}
                   for name, found in served.holders.items()],
    }
    if registry().config_error:  # the last edit of MODEL_CONFIG was refused
        body["config_error"] = registry().config_error
    if STOPPING.is_set():  # SIGTERM arrived (serve/worker.py): send no more traffic here
        body["ready"], body["reason"] = False, "shutting down"
        return body, 503
    if model is None:
        body["reason"] = h.load_error
        return body, 503
    body["model"] = {"name": model.name, "version": model.version, "precision": model.precision,
                     "loaded_at": model.loaded_at}
    return body


@bp.get("/metrics")
def metrics_route():
    data, content_type = metrics().render()
    return Response(data, content_type=content_type)


@bp.get("/openapi.json")
def openapi():
    return build_spec(holder().current)


def _start_timer() -> None:
    g.convnet_started = time.perf_counter()


def _count_request(response):
    # The route template, not the path, so /v1/models/<name> is one series whatever names arrive.
    route = request.url_rule.rule if request.url_rule else "unmatched"
    m = metrics()
    m.requests.labels(request.method, route, str(response.status_code)).inc()
    started = g.get("convnet_started")
    if started is not None:
        m.latency.labels(route).observe(time.perf_counter() - started)
    return response


def install_request_metrics(app: Flask) -> None:
    app.before_request(_start_timer)
    app.after_request(_count_request)
