"""Cross-origin access, off unless CORS_ORIGINS lists origins (or "*").

Flask already answers OPTIONS for every route; this only adds the headers a browser's preflight
and the actual request need, and only for an allowed Origin.
"""

from __future__ import annotations

from flask import Flask, current_app, request

# Request headers a page on an allowed origin may send: API keys (convnet.serve.auth) and a
# request id (convnet.serve.accesslog) besides the body's type.
ALLOWED_HEADERS = "Content-Type, Authorization, X-API-Key, X-Request-Id"
# Answer headers its script may read: when to retry, the request id to quote, the key's budget.
EXPOSED_HEADERS = ("Retry-After, X-Request-Id, X-RateLimit-Limit, X-RateLimit-Remaining, "
                   "X-RateLimit-Reset")
PREFLIGHT_MAX_AGE = "600"  # seconds a browser may cache a preflight answer


def _add_cors_headers(response):
    origins = current_app.config["CORS_ORIGINS"]
    origin = request.headers.get("Origin")
    if not origins or not origin:
        return response
    response.vary.add("Origin")  # the answer depends on Origin, so caches must key on it
    if "*" not in origins and origin not in origins:
        return response
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    if request.method == "OPTIONS":
        allowed = response.headers.get("Allow", "GET, POST, OPTIONS")
        response.headers["Access-Control-Allow-Methods"] = allowed
        response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
        response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
    return response


def install(app: Flask) -> None:
    app.after_request(_add_cors_headers)
