"""The HTTP server: a web page, a JSON API, TensorFlow Serving's REST API and KServe's V2 protocol,
all in front of one ONNX model directory.

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

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # src/convnet: templates/ and static/
DEFAULTS: dict[str, object] = {
    "MODEL_DIR": None,  # a model root or one version folder; None = the bundled CIFAR-10 model
    "MAX_CONTENT_LENGTH": 10 * 1024 * 1024,  # bytes per request body; more gets a 413
    "MAX_IMAGE_PIXELS": MAX_PIXELS,  # width x height per image, read from the header; more: 413
    # Pixels a worker's threads may hold decoded at once (4-16 bytes each, by format); an image
    # that does not fit gets 503 + Retry-After. None = MAX_IMAGE_PIXELS; never less than that.
    "DECODE_BUDGET_PIXELS": None,
    "MAX_IMAGES_PER_REQUEST": 64,  # images per request
    "MAX_EXPLAIN_IMAGES": 8,  # images per request with explain=1 (49 extra model runs each)
    "RELOAD_INTERVAL": 2.0,  # seconds between polls of the model root for new versions; 0 = off
    "INFERENCE_THREADS": 1,  # ONNX Runtime threads per worker; 0 = one per core
    # Micro-batching (convnet.serve.batching): concurrent requests in a worker share inference
    # calls of up to BATCH_MAX_SIZE images; 1 = off, each request runs alone.
    "BATCH_MAX_SIZE": 64,  # images per inference call, at most
    "BATCH_MAX_DELAY_MS": 2.0,  # ms a forming batch may wait for requests still being decoded
    "CORS_ORIGINS": [],  # origins allowed to call us from a browser; ["*"] = any; [] = CORS off
}


def _normalise(config) -> None:
    """Env vars arrive as strings or JSON; bring every setting to its documented type."""
    origins = config["CORS_ORIGINS"]
    if isinstance(origins, str):
        origins = [o.strip() for o in origins.split(",")]
    config["CORS_ORIGINS"] = [o for o in origins or [] if o]
    model_dir = config["MODEL_DIR"]  # CONVNET_MODEL_DIR=7 arrives as the JSON number 7
    config["MODEL_DIR"] = str(model_dir) if model_dir not in (None, "") else None
    if config["DECODE_BUDGET_PIXELS"] in (None, ""):
        config["DECODE_BUDGET_PIXELS"] = config["MAX_IMAGE_PIXELS"]
    for key in ("MAX_CONTENT_LENGTH", "MAX_IMAGE_PIXELS", "DECODE_BUDGET_PIXELS",
                "MAX_IMAGES_PER_REQUEST", "MAX_EXPLAIN_IMAGES", "INFERENCE_THREADS",
                "BATCH_MAX_SIZE"):
        config[key] = int(config[key])
    if config["DECODE_BUDGET_PIXELS"] < config["MAX_IMAGE_PIXELS"]:
        # Else an image within the per-image limit could never be decoded, even by an idle worker.
        raise ValueError("DECODE_BUDGET_PIXELS must be at least MAX_IMAGE_PIXELS")
    for key in ("RELOAD_INTERVAL", "BATCH_MAX_DELAY_MS"):
        config[key] = float(config[key])
    if config["BATCH_MAX_SIZE"] < 1 or config["BATCH_MAX_DELAY_MS"] < 0:
        raise ValueError("BATCH_MAX_SIZE must be at least 1 and BATCH_MAX_DELAY_MS at least 0")


def create_app(config: dict | None = None) -> Flask:
    """Build the app and load the model (polling for new versions if RELOAD_INTERVAL > 0)."""
    app = Flask(__name__, template_folder=str(PACKAGE_DIR / "templates"),
                static_folder=str(PACKAGE_DIR / "static"))
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("CONVNET")
    app.config.update(config or {})
    _normalise(app.config)

    # Imported here rather than at the top: `convnet.serve.server` is a submodule, so importing it
    # runs this file first, and it must set PROMETHEUS_MULTIPROC_DIR before prometheus_client is
    # imported (the client picks its storage once, at import).
    from convnet.serve import api, cors, modelpage, ops, pipeline, tfserving, v2, web
    from convnet.serve.batching import ModelBatchers
    from convnet.serve.decode import DecodeBudget
    from convnet.serve.errors import register_error_handlers
    from convnet.serve.holder import ModelHolder
    from convnet.serve.metrics import ServeMetrics
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

    def loaded(model) -> None:
        batchers.use(model)
        metrics.model_loaded(model)

    holder = ModelHolder(
        app.config["MODEL_DIR"],
        reload_interval=app.config["RELOAD_INTERVAL"],
        inference_threads=app.config["INFERENCE_THREADS"],
        on_load=loaded,
        on_refuse=metrics.model_refused,
    )
    app.extensions["convnet.metrics"] = metrics
    app.extensions["convnet.holder"] = holder
    app.extensions["convnet.batchers"] = batchers
    app.extensions["convnet.decode_budget"] = DecodeBudget(
        app.config["DECODE_BUDGET_PIXELS"], on_refuse=metrics.decode_refusals.inc)
    holder.load_initial()  # now, so the first request does not pay for it
    holder.start()

    ops.install_request_metrics(app)  # first, so the timer also covers refused requests
    app.before_request(refuse_oversized_body)
    app.teardown_request(pipeline.withdraw_arrival)
    register_error_handlers(app)
    cors.install(app)
    for module in (web, modelpage, api, tfserving, v2, ops):
        app.register_blueprint(module.bp)
    return app
