"""Prometheus metrics for the server: requests, latency, batch sizes, model reloads, images
refused because a worker's decode budget was full, feedback received and stored, and the memory
each loaded model version holds.

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

from convnet.serve.connections import LedgerCollector
from convnet.serve.holder import Refusal
from convnet.serve.model import LoadedModel

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # images per inference call


class ServeMetrics:
    def __init__(self) -> None:
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
        self.feedback_received = Counter(
            "convnet_feedback_received", "Feedback requests received, by door (api, page).",
            ["source"], registry=r,
        )
        self.feedback_stored = Counter(
            "convnet_feedback_stored", "Feedback items committed to the store, by door.",
            ["source"], registry=r,
        )
        self.feedback_failures = Counter(
            "convnet_feedback_store_failures",
            "Feedback refused with 503 because the database was locked or unreachable.",
            registry=r,
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
        # "liveall" too: each worker opens its own session and measures its own growth (a
        # worker's first load also pays for ONNX Runtime's own set-up), a dead worker's series
        # goes, and sum by (version) is what the host holds. "max" would keep dead workers'.
        self.model_memory = Gauge(
            "convnet_model_memory_bytes",
            "Resident memory a worker grew by loading a model version (ONNX Runtime session and "
            "test inference, from /proc/self/statm; at least the .onnx file's size). Per worker; "
            "a version replaced by a hot reload is removed (0 under gunicorn).",
            ["model", "version", "precision"], registry=r, multiprocess_mode="liveall",
        )
        # slot (see ModelHolder.slot) -> the memory series of the version loaded in it now
        self._memory_labels: dict[object, tuple[str, str, str]] = {}

    def model_loaded(self, model: LoadedModel, slot: object = None, primary: bool = True) -> None:
        """Count a load; its memory replaces that of the version which had its `slot`.
        primary: the default model's newest version, which convnet_model_version reports."""
        self.reloads.labels("loaded").inc()
        if primary:
            self.model_version.set(model.version)
        labels = (model.name, str(model.version), model.precision)
        previous = self._memory_labels.get(slot)
        if (previous is not None and previous != labels
                and list(self._memory_labels.values()).count(previous) == 1):
            self._forget_memory(previous)
        self.model_memory.labels(*labels).set(model.memory_bytes)
        self._memory_labels[slot] = labels

    def model_unloaded(self, slot: object) -> None:
        """The version in `slot` is gone (its model left the config): drop its memory."""
        labels = self._memory_labels.pop(slot, None)
        if labels is not None and labels not in self._memory_labels.values():
            self._forget_memory(labels)  # unless a new holder of that model loaded it again

    def _forget_memory(self, labels: tuple[str, str, str]) -> None:
        """The replaced version's series: removed, or zeroed where remove() cannot reach it
        (the multiprocess files outlive it; prometheus_client only warns)."""
        if MULTIPROC_ENV in os.environ:
            self.model_memory.labels(*labels).set(0)
        else:
            self.model_memory.remove(*labels)

    def model_refused(self, refusal: Refusal) -> None:
        self.reloads.labels("refused").inc()
        self.refused_version.set(refusal.version)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(LedgerCollector())  # read live, from the workers' shared ledger
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
