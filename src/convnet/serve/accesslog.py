"""Access logs: one JSON line per request, and a request id in every answer's X-Request-Id.

ACCESS_LOG (CONVNET_ACCESS_LOG) says where lines go: "-" standard error (the default), a file
path (appended to; every worker and replica may share one, each line is one write to an O_APPEND
file), or "" for none. A line:

    {"time": "2026-11-30T06:00:00.123Z", "request_id": "3f2a...", "method": "POST",
     "path": "/api/v1/predict", "route": "/api/v1/predict", "status": 200, "latency_ms": 4.31,
     "model": "cifar10", "version": 3, "images": 2, "key": "ci-bot", "remote_addr": "10.0.0.7",
     "bytes_in": 1890, "worker": 4242}

`model`/`version` are the model that answered (null if the request never reached one), `images`
how many images it ran, `key` the API key's name (null with keys off): never the key, never any
of the body. The request id is the client's X-Request-Id when it is sane (1-128 characters of
letters, digits and `._:@/+=-`), else a fresh random one, so a client's id can follow a request
through nginx and the replicas' logs and nothing odd reaches a log line or a header.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import sys
import threading
import time

from flask import Flask, Response, current_app, g, request

from convnet.serve.auth import key_name

REQUEST_ID_HEADER = "X-Request-Id"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
MAX_LOGGED_PATH = 512  # characters of the request path kept in a line
STDERR = "-"


class AccessLog:
    """Where lines go: standard error, a file, or nowhere (target "")."""

    def __init__(self, target: str):
        self.target = target
        self._lock = threading.Lock()
        self._fd: int | None = None
        if target and target != STDERR:
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write(self, entry: dict) -> None:
        if not self.target:
            return
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        if self._fd is not None:
            os.write(self._fd, line.encode())  # one write per line: lines never interleave
            return
        with self._lock:  # sys.stderr looked up each time: tests and servers may swap it
            sys.stderr.write(line)
            sys.stderr.flush()


_generator: tuple[int, random.Random] | None = None  # this process's (pid, generator)


def _new_id() -> str:
    """128 random bits as 32 hex digits, as uuid4().hex but without uuid4's read of the
    kernel's random source on every call: a system call that lets go of the GIL, which under
    load another thread takes. Seeded from that source once per process (after a fork a
    process never continues its parent's sequence)."""
    global _generator
    if _generator is None or _generator[0] != os.getpid():
        _generator = (os.getpid(), random.Random())
    return f"{_generator[1].getrandbits(128):032x}"


def request_id() -> str:
    """This request's id (the client's if sane, else a new one)."""
    found = g.get("request_id")
    if found is None:
        supplied = request.headers.get(REQUEST_ID_HEADER, "")
        found = supplied if SANE_REQUEST_ID.fullmatch(supplied) else _new_id()
        g.request_id = found
    return found


def _entry(response: Response, rid: str) -> dict:
    started = g.get("convnet_started")  # set by convnet.serve.ops, the first hook of all
    model = g.get("convnet_served")  # set by pipeline.get_model
    now = datetime.datetime.now(datetime.UTC)
    return {
        "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": rid,
        "method": request.method,
        "path": request.path[:MAX_LOGGED_PATH],
        "route": request.url_rule.rule if request.url_rule else None,
        "status": response.status_code,
        "latency_ms": (round((time.perf_counter() - started) * 1000, 2)
                       if started is not None else None),
        "model": model.name if model is not None else None,
        "version": model.version if model is not None else None,
        "images": g.get("convnet_images", 0),
        "key": key_name(),
        "remote_addr": request.remote_addr,
        "bytes_in": request.content_length,
        "worker": os.getpid(),
    }


def _begin() -> None:
    request_id()


def _finish(response: Response) -> Response:
    rid = response.headers[REQUEST_ID_HEADER] = request_id()
    log: AccessLog | None = current_app.extensions.get("convnet.access_log")
    if log is not None:
        log.write(_entry(response, rid))
    return response


def install_access_log(app: Flask) -> None:
    """Log every request; call after ops.install_request_metrics (its timer) and before any
    hook that may refuse a request, so refusals get an id and a line too."""
    target = app.config["ACCESS_LOG"]
    app.extensions["convnet.access_log"] = AccessLog(target) if target else None
    app.before_request(_begin)
    app.after_request(_finish)
