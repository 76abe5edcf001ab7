"""Prometheus metrics for the server: requests, latency, batch sizes, model reloads and images
refused because a worker's decode budget was full.

Each app gets its own registry, so tests can build many apps in one process. Under gunicorn,
`convnet.serve.server` points PROMETHEUS_MULTIPROC_DIR at a fresh folder before any worker starts;
every worker then writes its samples there and /metrics sums them over all workers.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from convnet.serve.holder import Refusal
from convnet.serve.model import LoadedModel

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # images per inference call


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "convnet_http_requests", "HTTP requests answered, by route template and status.",
            ["method", "route", "status"], registry=r,
        )
        self.latency = Histogram(
            "convnet_http_request_duration_seconds", "Time to answer a request, by route.",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_images = Histogram(
            "convnet_inference_batch_images", "Images per inference call.",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.inference_seconds = Histogram(
            "convnet_inference_duration_seconds", "Time spent in ONNX Runtime per call.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.decode_refusals = Counter(
            "convnet_decode_budget_refusals",
            "Images refused with 503 because the worker's decode budget (DECODE_BUDGET_PIXELS) "
            "was full.", registry=r,
        )
        self.reloads = Counter(
            "convnet_model_loads", "Model versions loaded or refused (summed over workers).",
            ["result"], registry=r,
        )
        # "liveall": one series per live worker, since workers swap versions independently.
        self.model_version = Gauge(
            "convnet_model_version", "Version of the model being served.",
            registry=r, multiprocess_mode="liveall",
        )
        self.refused_version = Gauge(
            "convnet_model_refused_version", "Most recent version refused (0: none).",
            registry=r, multiprocess_mode="livemax",
        )

    def model_loaded(self, model: LoadedModel) -> None:
        self.reloads.labels("loaded").inc()
        self.model_version.set(model.version)

    def model_refused(self, refusal: Refusal) -> None:
        self.reloads.labels("refused").inc()
        self.refused_version.set(refusal.version)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
