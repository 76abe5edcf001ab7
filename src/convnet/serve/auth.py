"""Optional API keys: off unless API_KEYS_FILE (CONVNET_API_KEYS_FILE) names a file of key
hashes, written by `convnet keys create` (convnet.keys).

When on, every request needs a key, sent as `Authorization: Bearer KEY` or `X-API-Key: KEY`
(or as the password of HTTP Basic auth, which is how a browser sends it to the web page), except:

- the probes and scrape targets: /healthz, /readyz, /v2/health/live, /v2/health/ready, /metrics;
- /openapi.json and the page's static assets (documentation and code, no data);
- CORS preflights (OPTIONS), which browsers send without credentials.

The web page (GET /, its no-JavaScript form POST /, POST /feedback, /models/NAME) is protected
like the API: it runs the model, so an open page would be an open API. Its 401 also offers
Basic auth, so a browser asks for the key once (any user name, the key as password) and then
sends it with every request to the server, the page script's /api/v1/predict calls included.

A missing, wrong or malformed key gets 401, `WWW-Authenticate: Bearer realm="convnet"` and a
JSON error, before any of the body is used. The file is checked for changes (one stat) on every
request and re-read when it changed, so `convnet keys create/revoke` take effect at once without
a restart; a file that turns unreadable or malformed leaves the keys read before in force (and
is logged), never auth off. At start a missing or malformed file is an error.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import threading

from flask import Flask, Response, current_app, g, request

from convnet.keys import KeyRecord, KeysFileError, hash_key, read_keys
from convnet.serve.errors import json_error

log = logging.getLogger(__name__)

# Endpoints anyone may call: probes, metrics, the API description, static files.
EXEMPT_ENDPOINTS = frozenset({"ops.healthz", "ops.readyz", "ops.metrics_route", "ops.openapi",
                              "v2.live", "v2.ready", "static"})
PAGE_BLUEPRINTS = frozenset({"web", "models"})  # HTML for browsers: offer Basic auth too
MAX_KEY_LENGTH = 256  # characters; ours are 47
REALM = 'realm="convnet"'
DRAIN_CHUNK = 64 * 1024  # bytes read at a time when discarding a refused body


class KeyRing:
    """The key records of one keys file, re-read whenever the file changes."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.records: list[KeyRecord] = read_keys(self.path)  # at start: errors are fatal
        self._stamp = self._stat()
        self._lock = threading.Lock()
        log.info("API keys on: %d keys in %s", len(self.records), self.path)

    def _stat(self) -> tuple[int, int, int] | None:
        """What changes when the file is replaced or edited (None: it is gone)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def refresh(self) -> None:
        """Re-read the file if it changed since it was last read."""
        stamp = self._stat()
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:  # another thread read it meanwhile
                return
            self._stamp = stamp  # a bad file is reported once, not on every request
            if stamp is None:
                log.error("API keys file %s is gone; keeping the %d keys read before",
                          self.path, len(self.records))
                return
            try:
                self.records = read_keys(self.path)
            except KeysFileError as exc:
                log.error("%s; keeping the %d keys read before", exc, len(self.records))
                return
            log.info("API keys: re-read %s, %d keys", self.path, len(self.records))

    def find(self, key: str) -> KeyRecord | None:
        """The record whose hash matches `key`'s, compared in constant time. Every record is
        compared, matching or not, so the time taken says nothing about which one matched."""
        digest = hash_key(key)
        found = None
        for record in self.records:
            if hmac.compare_digest(record.sha256, digest):
                found = record
        return found


class Unauthorised(Exception):
    def __init__(self, message: str, error: str | None = None):
        super().__init__(message)
        self.message, self.error = message, error  # error: RFC 6750's code, if any


def _basic_password(encoded: str) -> str:
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorised("malformed Authorization header: Basic credentials are not base64 "
                           "of 'user:key'", "invalid_request") from None
    user, colon, password = decoded.partition(":")
    if not colon:
        raise Unauthorised("malformed Authorization header: Basic credentials need "
                           "'user:key'", "invalid_request")
    return password


def presented_key() -> str | None:
    """The key the request carries (None if it carries none); Unauthorised if malformed."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            key = value
        elif scheme.lower() == "basic" and value:
            key = _basic_password(value)
        else:
            raise Unauthorised("malformed Authorization header: expected 'Bearer <key>'",
                               "invalid_request")
    else:
        found = request.headers.get("X-API-Key")
        if found is None:
            return None
        key = found.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not (key.isascii() and key.isprintable()):
        raise Unauthorised("malformed API key", "invalid_request")
    return key


def discard_body() -> None:
    """Read what the client sends and throw it away (MAX_CONTENT_LENGTH bounds it: larger bodies
    were refused before). Answering and closing while a client is still sending makes it see a
    connection reset instead of our answer."""
    stream = request.stream
    while stream.read(DRAIN_CHUNK):
        pass


def unauthorised(exc: Unauthorised) -> Response:
    """The 401: a JSON error and the challenges a client may answer."""
    response = json_error(exc.message, 401)
    error = f', error="{exc.error}"' if exc.error else ""
    response.headers.add("WWW-Authenticate", f"Bearer {REALM}{error}")
    if request.blueprint in PAGE_BLUEPRINTS:
        # A header of its own: browsers read one challenge per WWW-Authenticate line.
        response.headers.add("WWW-Authenticate", f'Basic {REALM}, charset="UTF-8"')
    return response


def require_key() -> Response | None:
    """before_request: let the request on if keys are off, it is exempt, or its key is known;
    else answer 401."""
    ring: KeyRing | None = current_app.extensions.get("convnet.keys")
    if ring is None or request.method == "OPTIONS" or request.endpoint in EXEMPT_ENDPOINTS:
        return None
    ring.refresh()
    try:
        key = presented_key()
        if key is None:
            raise Unauthorised("this server needs an API key: send 'Authorization: Bearer "
                               "<key>' or 'X-API-Key: <key>'")
        record = ring.find(key)
        if record is None:
            raise Unauthorised("unknown or revoked API key", "invalid_token")
    except Unauthorised as exc:
        discard_body()
        # Returned, not raised: the page's error handler would render the page (model card
        # included) around the message; a refused client gets the error alone.
        return unauthorised(exc)
    g.convnet_key = record
    return None


def key_name() -> str | None:
    """The name of the key this request was let in with (None: keys off, or an exempt route)."""
    record = g.get("convnet_key")
    return record.name if record is not None else None


def install_api_keys(app: Flask) -> None:
    """Turn keys on if API_KEYS_FILE names a file (KeysFileError if it cannot be read)."""
    path = app.config["API_KEYS_FILE"]
    app.extensions["convnet.keys"] = KeyRing(path) if path else None
    app.before_request(require_key)
