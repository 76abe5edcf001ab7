"""Rate limits per API key (per client address when keys are off), with Flask-Limiter: 429, a
JSON error and `Retry-After` past the limit.

RATE_LIMIT (e.g. "100/minute", or "10/second; 1000/hour") applies to each key that has no limit
of its own (`convnet keys create --rate-limit`); "" and no per-key limit = none. One budget per
key covers every door that needs a key: the APIs and the web page alike. Exempt routes (probes,
/metrics, static files; convnet.serve.auth) are never counted.

Counters must be shared by all of a server's workers, or a limit of N lets through up to N per
worker: Flask-Limiter's `memory://` is per process. RATE_LIMIT_STORAGE takes any `limits`
storage URI (redis://... for replicas on several hosts) plus `sqlite://PATH`, defined here: one
SQLite file, shared by every process that opens it. `convnet serve` gives its workers a fresh
one in a temporary folder; deploy/replicas.sh gives all its replicas one file, so the limit holds
across replicas on that host too. The fixed-window strategy: a window opens at a key's first
request and its count resets when it ends (so a client may spend up to 2 x the limit across a
window's end; the cost of one upsert per request instead of one row per request).
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time

from flask import Flask, Response, current_app, g, request
from flask_limiter import ApplicationLimit, Limiter, RequestLimit
from limits.storage import Storage

from convnet.keys import check_rate_limit
from convnet.serve.auth import EXEMPT_ENDPOINTS, discard_body, key_name

SQLITE_TIMEOUT_S = 5.0  # seconds a process waits for another's write to the counter file
PURGE_EVERY = 1000  # increments between deletions of expired counters


class SQLiteStorage(Storage):
    """`limits` storage in one SQLite file: `sqlite:///abs/path` or `sqlite://relative/path`.

    Each counter is one row, changed by a single upsert (atomic in SQLite), so processes and
    threads sharing the file never lose a count. Local disks only: SQLite's locks do not hold
    on network filesystems.
    """

    STORAGE_SCHEME = ["sqlite"]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options):
        super().__init__(uri, wrap_exceptions, **options)
        self.path = (uri or "").split("://", 1)[-1]
        if not self.path:
            raise ValueError("sqlite:// storage needs a file: sqlite:///path/to/limits.sqlite3")
        self._local = threading.local()  # a connection per thread (and per process: see _db)
        self._increments = 0

    @property
    def base_exceptions(self) -> type[Exception]:
        return sqlite3.Error

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():
            # Autocommit: every statement is its own transaction.
            db = sqlite3.connect(self.path, timeout=SQLITE_TIMEOUT_S, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            db.execute("PRAGMA synchronous=OFF")  # counters need not survive a power cut
            db.execute("CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, "
                       "value INTEGER NOT NULL, expires REAL NOT NULL)")
            self._local.db, self._local.pid = db, os.getpid()
        return db

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        rows = self._db().execute(
            "INSERT INTO counters (key, value, expires) VALUES (?1, ?2, ?3) "
            "ON CONFLICT (key) DO UPDATE SET "
            "value = CASE WHEN expires <= ?4 THEN excluded.value ELSE value + excluded.value END, "
            "expires = CASE WHEN expires <= ?4 THEN excluded.expires ELSE expires END "
            "RETURNING value",
            (key, amount, now + expiry, now),
        ).fetchall()  # all of it: the statement's transaction ends when it has been stepped through
        self._increments += 1
        if self._increments % PURGE_EVERY == 0:
            self._db().execute("DELETE FROM counters WHERE expires <= ?", (now,))
        return int(rows[0][0])

    def _row(self, key: str) -> tuple[int, float] | None:
        row = self._db().execute("SELECT value, expires FROM counters WHERE key = ? AND "
                                 "expires > ?", (key, time.time())).fetchone()
        return (int(row[0]), float(row[1])) if row else None

    def get(self, key: str) -> int:
        row = self._row(key)
        return row[0] if row else 0

    def get_expiry(self, key: str) -> float:
        row = self._row(key)
        return row[1] if row else time.time()

    def check(self) -> bool:
        try:
            self._db().execute("SELECT 1").fetchall()
        except sqlite3.Error:
            return False
        return True

    def reset(self) -> int | None:
        return self._db().execute("DELETE FROM counters").rowcount

    def clear(self, key: str) -> None:
        self._db().execute("DELETE FROM counters WHERE key = ?", (key,))


def limit_subject() -> str:
    """Whose budget a request spends: its key's, or with keys off its client address'."""
    name = key_name()
    return f"key:{name}" if name is not None else f"addr:{request.remote_addr}"


def current_limit() -> str:
    """The limit for this request's key: its own, else RATE_LIMIT ("" = none)."""
    record = g.get("convnet_key")
    own = record.rate_limit if record is not None else None
    return own or current_app.config["RATE_LIMIT"]


def _exempt() -> bool:
    return request.method == "OPTIONS" or request.endpoint in EXEMPT_ENDPOINTS


def _breach_message() -> str:
    name = key_name()
    whose = f"API key {name!r}" if name is not None else f"client {request.remote_addr}"
    return f"too many requests: {whose} may make {current_limit()}"


def _on_breach(limit: RequestLimit) -> None:
    discard_body()  # as for a 401: the client reads the 429 rather than a reset connection


def _add_headers(response: Response) -> Response:
    """X-RateLimit-* on every limited answer, Retry-After (whole seconds, at least 1) on a 429."""
    limiter: Limiter | None = current_app.extensions.get("convnet.limiter")
    found = limiter.current_limit if limiter is not None else None
    if found is None:
        return response
    reset_at, remaining = found.window
    response.headers["X-RateLimit-Limit"] = str(found.limit.amount)
    response.headers["X-RateLimit-Remaining"] = str(remaining)
    response.headers["X-RateLimit-Reset"] = str(math.ceil(reset_at))  # Unix time, seconds
    if response.status_code == 429:
        response.headers["Retry-After"] = str(max(1, math.ceil(reset_at - time.time())))
    return response


def install_rate_limits(app: Flask) -> None:
    """Limit requests as RATE_LIMIT and the keys say, counting in RATE_LIMIT_STORAGE. Must come
    after convnet.serve.auth's hook, which finds the request's key. With neither RATE_LIMIT nor
    API keys (whose entries may carry limits) nothing can be limited, and nothing is installed:
    Flask-Limiter's check costs about 0.12 ms a request even with no limit to apply."""
    if not app.config["RATE_LIMIT"] and not app.config.get("API_KEYS_FILE"):
        return
    if app.config["RATE_LIMIT"]:
        check_rate_limit(app.config["RATE_LIMIT"])  # a typo fails the start, not each request
    limiter = Limiter(
        limit_subject,
        application_limits=[ApplicationLimit(current_limit, error_message=_breach_message,
                                             on_breach=_on_breach)],
        storage_uri=app.config["RATE_LIMIT_STORAGE"],
        strategy="fixed-window",
        headers_enabled=False,  # _add_headers: Flask-Limiter's would put Retry-After on a 200
        key_prefix="convnet",
        # A counter store that fails mid-run is logged and the request served: a limit is a
        # guard against overuse, not worth an outage. A bad store fails at start (check below).
        swallow_errors=True,
    )
    limiter.request_filter(_exempt)
    limiter.init_app(app)
    if not limiter.storage.check():
        raise ValueError(f"RATE_LIMIT_STORAGE {app.config['RATE_LIMIT_STORAGE']!r} does not "
                         "answer")
    app.extensions["convnet.limiter"] = limiter
    app.after_request(_add_headers)
