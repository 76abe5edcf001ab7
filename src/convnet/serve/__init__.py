"""The HTTP server: a web page, a JSON API, TensorFlow Serving's REST API and KServe's V2 protocol,
all in front of one ONNX model directory, or of several (MODEL_CONFIG, convnet.serve.models_config).

Run it for development with `flask --app convnet.serve run`, in production with `convnet serve`
(gunicorn, see `convnet.serve.server`). Settings come from, in increasing priority, DEFAULTS below,
environment variables `CONVNET_<NAME>` (e.g. CONVNET_MODEL_DIR=runs/cifar10,
CONVNET_CORS_ORIGINS=https://a.example,https://b.example) and the `config` argument.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask

from convnet.imaging import MAX_PIXELS
from convnet.modeldir import PRECISIONS

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # src/convnet: templates/ and static/
DEFAULTS: dict[str, object] = {
    "MODEL_DIR": None,  # a model root or one version folder; None = the bundled CIFAR-10 model
    # A YAML file of several models, versions and labels (convnet.serve.models_config), polled
    # like the roots every RELOAD_INTERVAL; None = serve MODEL_DIR alone. Not both.
    "MODEL_CONFIG": None,
    "MAX_CONTENT_LENGTH": 10 * 1024 * 1024,  # bytes per request body; more gets a 413
    "MAX_IMAGE_PIXELS": MAX_PIXELS,  # width x height per image, read from the header; more: 413
    # Pixels a worker's threads may hold decoded at once (4-16 bytes each, by format); an image
    # that does not fit gets 503 + Retry-After. None = MAX_IMAGE_PIXELS; never less than that.
    "DECODE_BUDGET_PIXELS": None,
    "MAX_IMAGES_PER_REQUEST": 64,  # images per request
    "MAX_EXPLAIN_IMAGES": 8,  # images per request with explain=1 (49 extra model runs each)
    "RELOAD_INTERVAL": 2.0,  # seconds between polls of the model root for new versions; 0 = off
    "INFERENCE_THREADS": 1,  # ONNX Runtime threads per worker; 0 = one per core
    # "float" serves model.onnx; "int8" each version's model.int8.onnx (`convnet export
    # --quantize int8`), refusing versions without one. Speed, accuracy: bench/results/quantize.md
    "PRECISION": "auto",  # auto: model.int8.onnx where a version has one, else model.onnx
    # Micro-batching (convnet.serve.batching): concurrent requests in a worker share inference
    # calls of up to BATCH_MAX_SIZE images; 1 = off, each request runs alone.
    "BATCH_MAX_SIZE": 64,  # images per inference call, at most
    "BATCH_MAX_DELAY_MS": 2.0,  # ms a forming batch may wait for requests still being decoded
    "CORS_ORIGINS": [],  # origins allowed to call us from a browser; ["*"] = any; [] = CORS off
    # Feedback (convnet.serve.feedback): a SQLite file path, or a postgresql:// URL shared by
    # replicas; "" turns feedback off. Opened at the first feedback, not at start.
    "FEEDBACK_DB": "feedback.sqlite3",
    "FEEDBACK_MAX_ITEMS": 10_000,  # items the store may hold; more get 507
    "FEEDBACK_MAX_IMAGE_BYTES": 2 * 1024 * 1024,  # bytes of one feedback image; more get 413
    "FEEDBACK_KEEP_SECONDS": 3600.0,  # how long predict?keep=1 keeps an image for feedback
    "FEEDBACK_MAX_KEPT": 1000,  # images kept at once by predict?keep=1
    # API keys, limits and access logs (convnet.serve.auth, .ratelimit, .accesslog):
    "API_KEYS_FILE": None,  # file of key hashes (`convnet keys create`); None = keys off
    "RATE_LIMIT": "",  # per key (per address with keys off), e.g. "100/minute"; "" = none
    "RATE_LIMIT_STORAGE": "memory://",  # counters: per process; `convnet serve` shares a file
    "ACCESS_LOG": "-",  # JSON lines: "-" = stderr, a file path, or "" = off
}


def _normalise(config) -> None:
    """Env vars arrive as strings or JSON; bring every setting to its documented type."""
    origins = config["CORS_ORIGINS"]
    if isinstance(origins, str):
        origins = [o.strip() for o in origins.split(",")]
    config["CORS_ORIGINS"] = [o for o in origins or [] if o]
    model_dir = config["MODEL_DIR"]  # CONVNET_MODEL_DIR=7 arrives as the JSON number 7
    config["MODEL_DIR"] = str(model_dir) if model_dir not in (None, "") else None
    model_config = config["MODEL_CONFIG"]
    config["MODEL_CONFIG"] = str(model_config) if model_config not in (None, "") else None
    if config["MODEL_CONFIG"] and config["MODEL_DIR"]:
        raise ValueError("set MODEL_DIR (one model) or MODEL_CONFIG (several), not both")
    if config["PRECISION"] not in PRECISIONS:
        raise ValueError(f"PRECISION must be {', '.join(PRECISIONS)}, not "
                         f"{config['PRECISION']!r}")
    config["FEEDBACK_DB"] = str(config["FEEDBACK_DB"] or "")
    for key in ("API_KEYS_FILE", "RATE_LIMIT", "ACCESS_LOG"):  # None/"" = off
        config[key] = str(config[key]) if config[key] not in (None, "") else ""
    if config["DECODE_BUDGET_PIXELS"] in (None, ""):
        config["DECODE_BUDGET_PIXELS"] = config["MAX_IMAGE_PIXELS"]
    for key in ("MAX_CONTENT_LENGTH", "MAX_IMAGE_PIXELS", "DECODE_BUDGET_PIXELS",
                "MAX_IMAGES_PER_REQUEST", "MAX_EXPLAIN_IMAGES", "INFERENCE_THREADS",
                "BATCH_MAX_SIZE", "FEEDBACK_MAX_ITEMS", "FEEDBACK_MAX_IMAGE_BYTES",
                "FEEDBACK_MAX_KEPT"):
        config[key] = int(config[key])
    if config["DECODE_BUDGET_PIXELS"] < config["MAX_IMAGE_PIXELS"]:
        # Else an image within the per-image limit could never be decoded, even by an idle worker.
        raise ValueError("DECODE_BUDGET_PIXELS must be at least MAX_IMAGE_PIXELS")
    for key in ("RELOAD_INTERVAL", "BATCH_MAX_DELAY_MS", "FEEDBACK_KEEP_SECONDS"):
        config[key] = float(config[key])
    if config["BATCH_MAX_SIZE"] < 1 or config["BATCH_MAX_DELAY_MS"] < 0:
        raise ValueError("BATCH_MAX_SIZE must be at least 1 and BATCH_MAX_DELAY_MS at least 0")


SYNC_CACHE_SIZE = 1024  # views and hooks ServeApp remembers


class ServeApp(Flask):
    """Flask, remembering which views and hooks are plain functions: Flask asks
    inspect.iscoroutinefunction of each of the ten or so it calls, on every request (4% of the
    app's time under cProfile on this project's dev machine)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sync: dict = {}

    def ensure_sync(self, func):
        try:
            return self._sync[func]
        except KeyError:
            wrapped = super().ensure_sync(func)
            if len(self._sync) < SYNC_CACHE_SIZE:  # a function made per request stays out
                self._sync[func] = wrapped
            return wrapped
        except TypeError:  # not hashable: ask each time
            return super().ensure_sync(func)


def create_app(config: dict | None = None) -> Flask:
    """Build the app and load the models (polling for new versions, and for changes to the
    MODEL_CONFIG file, if RELOAD_INTERVAL > 0). Raises ConfigError for a config that cannot
    serve: one that does not parse, or a label at a version that did not load."""
    app = ServeApp(__name__, template_folder=str(PACKAGE_DIR / "templates"),
                   static_folder=str(PACKAGE_DIR / "static"))
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("CONVNET")
    app.config.update(config or {})
    _normalise(app.config)

    # Imported here rather than at the top: `convnet.serve.server` is a submodule, so importing it
    # runs this file first, and it must set PROMETHEUS_MULTIPROC_DIR before prometheus_client is
    # imported (the client picks its storage once, at import).
    from convnet.feedback.store import FeedbackStore
    from convnet.serve import api, cors, feedback, modelpage, ops, pipeline, tfserving, v2, web
    from convnet.serve.accesslog import install_access_log
    from convnet.serve.auth import install_api_keys
    from convnet.serve.batching import ModelBatchers
    from convnet.serve.decode import DecodeBudget
    from convnet.serve.errors import register_error_handlers
    from convnet.serve.metrics import ServeMetrics
    from convnet.serve.models_config import read_config, single_model
    from convnet.serve.ratelimit import install_rate_limits
    from convnet.serve.registry import ModelRegistry
    from convnet.serve.uploads import refuse_oversized_body

    # app.logger is the "convnet.serve" logger, parent of every module logger here. Flask gives
    # it a stderr handler unless logging is configured already (as gunicorn's `run` does).
    if app.logger.level == logging.NOTSET:
        app.logger.setLevel(logging.INFO)  # model loads and refusals are worth seeing by default

    metrics = ServeMetrics()
    batchers = ModelBatchers(
        lambda model: pipeline.timed_predict(model, metrics),
        max_batch_size=app.config["BATCH_MAX_SIZE"],
        max_delay_s=app.config["BATCH_MAX_DELAY_MS"] / 1000,
    )

    def loaded(model, slot, primary: bool) -> None:
        batchers.use(model, slot)
        metrics.model_loaded(model, slot, primary)

    def unloaded(slot) -> None:
        batchers.drop(slot)
        metrics.model_unloaded(slot)

    registry = ModelRegistry(
        read_config(app.config["MODEL_CONFIG"]) if app.config["MODEL_CONFIG"]
        else single_model(app.config["MODEL_DIR"]),
        reload_interval=app.config["RELOAD_INTERVAL"],
        holder_options={"reload_interval": app.config["RELOAD_INTERVAL"],
                        "inference_threads": app.config["INFERENCE_THREADS"],
                        "precision": app.config["PRECISION"]},
        on_load=loaded, on_refuse=metrics.model_refused, on_unload=unloaded,
    )
    app.extensions["convnet.metrics"] = metrics
    app.extensions["convnet.registry"] = registry
    app.extensions["convnet.batchers"] = batchers
    app.extensions["convnet.decode_budget"] = DecodeBudget(
        app.config["DECODE_BUDGET_PIXELS"], on_refuse=metrics.decode_refusals.inc)
    app.extensions["convnet.feedback"] = (
        FeedbackStore(app.config["FEEDBACK_DB"], app.config["FEEDBACK_MAX_ITEMS"])
        if app.config["FEEDBACK_DB"] else None)
    registry.load_initial()  # now, so the first request does not pay for it
    registry.start()

    ops.install_request_metrics(app)  # first, so the timer also covers refused requests
    install_access_log(app)  # next: refused requests get a request id and a log line too
    app.before_request(refuse_oversized_body)
    install_api_keys(app)
    install_rate_limits(app)  # after the key check: it finds whose budget a request spends
    app.after_request(pipeline.name_model)
    app.teardown_request(pipeline.withdraw_arrival)
    register_error_handlers(app)
    cors.install(app)
    for module in (web, modelpage, api, feedback, tfserving, v2, ops):
        app.register_blueprint(module.bp)
    return app
