"""Errors as HTTP answers: every client mistake becomes a 4xx with a message saying what was wrong,
and anything unexpected a JSON 500 without a traceback (the traceback goes to the log).

The web page's blueprint registers its own handlers that answer HTML instead; everything else,
the REST, TF Serving and V2 routes included, answers `{"error": "..."}` as TF Serving does.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from convnet.imaging import ImageError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request we refuse, with the message, HTTP status and extra headers the client gets;
    `extra`: more fields for the JSON body (e.g. the served models, with a 404)."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers or {}
        self.extra = extra or {}


def describe(exc: Exception) -> tuple[str, int]:
    """(message, status) for any exception a request can raise."""
    if isinstance(exc, ApiError):
        return exc.message, exc.status
    if isinstance(exc, ImageError):
        return str(exc), exc.status
    if isinstance(exc, HTTPException):
        return exc.description or exc.name, exc.code or 500
    return "internal server error", 500


def extra_headers(exc: Exception) -> dict[str, str]:
    """Headers an answer to `exc` carries besides the body (Retry-After on a 503)."""
    return exc.headers if isinstance(exc, ApiError) else {}


def json_error(message: str, status: int, headers: dict[str, str] | None = None,
               extra: dict | None = None):
    response = jsonify({**(extra or {}), "error": message})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    @app.errorhandler(ImageError)
    def client_error(exc):
        return json_error(*describe(exc), extra_headers(exc),
                          exc.extra if isinstance(exc, ApiError) else None)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        # Keep Werkzeug's headers (e.g. Allow on a 405), swap the HTML body for JSON.
        response = exc.get_response()
        response.set_data(json_error(*describe(exc)).get_data())
        response.content_type = "application/json"
        return response

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.exception("unhandled error")
        return json_error("internal server error", 500)
