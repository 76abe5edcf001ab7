"""Run the server for real: gunicorn, `workers` processes with `threads` threads each.

    from convnet.serve.server import run
    run(model="runs/cifar10", port=8000)        # what `convnet serve` calls
    run(model_config="models.yaml", port=8000)  # several models (convnet.serve.models_config)

Each worker builds its own app (and ONNX Runtime session) after the fork; nothing is preloaded in
the master, since threads and native sessions do not survive a fork. Prometheus samples from all
workers meet in a temporary PROMETHEUS_MULTIPROC_DIR made here and removed on exit.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import sys
import tempfile
from pathlib import Path

from gunicorn.app.base import BaseApplication
from gunicorn.errors import HaltServer

from convnet.modeldir import (
    PRECISION_FILES,
    PRECISIONS,
    ModelDirError,
    is_version_dir,
    model_name,
    resolve_version,
    version_number,
)
from convnet.serve.connections import ConnectionLedger
from convnet.serve.models_config import ConfigError, ModelsConfig, read_config

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_BOOT_ERROR = 3  # gunicorn.arbiter.Arbiter.WORKER_BOOT_ERROR: the master halts on it
KEYS_ENV, LIMITS_ENV = "CONVNET_API_KEYS_FILE", "CONVNET_RATE_LIMIT_STORAGE"
# pollworker.py needs Linux's epoll; elsewhere its base, gthread with the same shutdown.
WORKER_CLASS = ("convnet.serve.pollworker.PollingThreadWorker" if hasattr(select, "epoll")
                else "convnet.serve.worker.DrainingThreadWorker")
# Gunicorn 24+ opens a control socket in ~/.gunicorn by default: shared by every server a user
# starts (tests start several at once) and not needed by us.
OPTIONAL_SETTINGS = {"control_socket_disable"}


class _GunicornApp(BaseApplication):
    def __init__(self, app_config: dict, options: dict):
        self.app_config = app_config
        self.options = options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            if key in OPTIONAL_SETTINGS and key not in self.cfg.settings:
                continue  # an older gunicorn without this feature
            self.cfg.set(key, value)

    def load(self):
        from convnet.serve import create_app  # in the worker, after the fork
        from convnet.serve.models_config import ConfigError

        try:
            return create_app(self.app_config)
        except ConfigError as exc:  # a label at a version that did not load: one line, no trace
            print(f"convnet: {exc}", file=sys.stderr, flush=True)
            sys.exit(WORKER_BOOT_ERROR)  # gunicorn's own code for it: the master stops too


def _forget_worker(server, worker) -> None:
    """Gunicorn child_exit hook: drop a dead worker's live gauges from the shared samples and
    free its slot in the connection ledger."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
    ledger = getattr(worker, "ledger", None)
    if ledger is not None:
        ledger.release(worker.ledger_slot)


def _ledger_hook(ledger: ConnectionLedger):
    """Gunicorn pre_fork hook: the worker about to be forked gets the ledger and a slot in it
    (serve/connections.py), which it inherits."""

    def pre_fork(server, worker) -> None:
        worker.ledger, worker.ledger_slot = ledger, ledger.claim()

    return pre_fork


def _check_api_keys(config: dict) -> None:
    """KeysFileError now, with the reason, if API keys are on and their file is unreadable, or
    RATE_LIMIT is no limit."""
    from convnet.keys import check_rate_limit, read_keys

    path = config.get("API_KEYS_FILE") or os.environ.get(KEYS_ENV)
    if path:
        read_keys(path)
    limit = config.get("RATE_LIMIT") or os.environ.get("CONVNET_RATE_LIMIT")
    if limit:
        check_rate_limit(str(limit))


def check_model_config(path: str | os.PathLike) -> ModelsConfig:
    """The config at `path`, checked as far as the master can without loading a model (that
    is the workers' job, after the fork): it parses, and every labelled version has a folder.
    Raises ConfigError, naming the line."""
    config = read_config(Path(path).resolve())
    for spec in config.models:
        for label, version in spec.labels.items():
            if not is_version_dir(spec.base_path / str(version)):
                raise ConfigError(
                    f"{config.where(spec.label_lines.get(label, spec.line))}: label {label!r} "
                    f"of model {spec.name!r} points at version {version}, which is not loaded "
                    f"(no model in {spec.base_path / str(version)})")
    return config


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run(
    model: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 2,
    # Per worker; requests in flight = workers x threads. A worker's batches can only be as
    # large as its threads: at concurrency 64 on 2 cores, 2 x 16 (batches of 8) served 4-5%
    # more requests/s than 2 x 8 (batches of 4) in interleaved rounds since the request
    # threads poll for themselves (pollworker.py); 24 and 32 gained nothing more and lengthened
    # p99. Under gthread, 16 had been within noise of 8, and 8 4-12% above 4.
    threads: int = 16,
    *,
    batch_max_size: int | None = None,  # images per inference call; 1 = no batching
    batch_delay_ms: float | None = None,  # ms a forming batch may wait (None: app defaults)
    precision: str | None = None,  # "auto", "float" or "int8" (None: CONVNET_PRECISION or auto)
    config: dict | None = None,  # more app settings, e.g. {"RELOAD_INTERVAL": 0}
    model_config: str | os.PathLike | None = None,  # a models file instead of `model`
) -> None:
    """Serve `model` (a model root, a version folder, or None for the bundled model), or the
    models of the `model_config` file, until interrupted. Raises ModelDirError (ConfigError)
    before starting anything if there is no model to serve (the file has a mistake)."""
    if model_config is not None:
        if model is not None:
            raise ConfigError("give a model or a model config, not both")
        models = check_model_config(model_config)
        served = f"{', '.join(models.names)} (from {models.path})"
        config = {**(config or {}), "MODEL_CONFIG": str(models.path)}
        version_dir = None  # several roots, some perhaps empty yet: each holder checks its own
    else:
        version_dir = resolve_version(model)  # fail here, once, with the reason
        served = f"{model_name(version_dir)} version {version_number(version_dir)}"
    _check_api_keys(config or {})  # likewise: else every worker would fail to boot
    app_config = dict(config or {})
    if precision is not None:
        app_config["PRECISION"] = precision
    chosen = app_config.get("PRECISION") or os.environ.get("CONVNET_PRECISION") or "auto"
    if chosen not in PRECISIONS:
        raise ModelDirError(f"unknown precision {chosen!r}: {', '.join(PRECISIONS)}")
    if (chosen == "int8" and version_dir is not None
            and not (version_dir / PRECISION_FILES[chosen]).is_file()):
        raise ModelDirError(f"{version_dir} has no {PRECISION_FILES[chosen]}: no int8 model to "
                            "serve (make one with `convnet export --quantize int8`, or serve in "
                            "float)")
    if model is not None:
        app_config["MODEL_DIR"] = str(model)
    if batch_max_size is not None:
        app_config["BATCH_MAX_SIZE"] = batch_max_size
    if batch_delay_ms is not None:
        app_config["BATCH_MAX_DELAY_MS"] = batch_delay_ms
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s "
                        "%(name)s: %(message)s")

    def announce(server) -> None:
        bound_port = server.LISTENERS[0].sock.getsockname()[1]  # the real one when port=0
        print(f"convnet: serving {served} at {_url(host, bound_port)}  "
              "(Ctrl-C stops)", flush=True)

    options = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        # request threads that poll their connections, listeners closed at once on SIGTERM so
        # that no queued connection is reset (serve/pollworker.py, serve/worker.py)
        "worker_class": WORKER_CLASS,
        "timeout": 60,  # seconds a worker may stay silent before it is restarted
        "graceful_timeout": 10,  # seconds to finish requests in flight on shutdown
        "keepalive": 5,  # seconds an idle keep-alive connection stays open
        "proc_name": "convnet-serve",
        "when_ready": announce,
        "child_exit": _forget_worker,
        "pre_fork": _ledger_hook(ConnectionLedger()),
        "control_socket_disable": True,
    }
    if "prometheus_client" in sys.modules and not os.environ.get(MULTIPROC_ENV):
        logging.getLogger(__name__).warning(
            "prometheus_client was imported before run(): it has already chosen single-process "
            "storage, so /metrics will show only the answering worker's samples")
    limits_dir = None
    if "RATE_LIMIT_STORAGE" not in app_config and not os.environ.get(LIMITS_ENV):
        # One counter file for all workers, so a rate limit holds across them (Flask-Limiter's
        # memory:// counts per worker, letting through up to workers x the limit).
        limits_dir = tempfile.mkdtemp(prefix="convnet-limits-")
        app_config["RATE_LIMIT_STORAGE"] = f"sqlite://{limits_dir}/limits.sqlite3"
    master = os.getpid()
    previous = os.environ.get(MULTIPROC_ENV)
    metrics_dir = tempfile.mkdtemp(prefix="convnet-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        _GunicornApp(app_config, options).run()
    except HaltServer as exc:
        # gunicorn halts on the first worker that fails to boot; when a second one fails while
        # it stops, its reap raises HaltServer again out of halt(). The workers have said why.
        sys.exit(exc.exit_status)
    finally:
        # Workers are forked inside run() and leave through here too; only the master cleans up.
        if os.getpid() == master:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            if limits_dir is not None:
                shutil.rmtree(limits_dir, ignore_errors=True)
            if previous is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = previous
            print("convnet: stopped", file=sys.stderr, flush=True)
