"""Reading request bodies: in memory only, size-capped, JSON parsed with clear 400s.

Nothing a client sends is written to disk: bodies are read whole into memory, which
MAX_CONTENT_LENGTH (10 MB) bounds, whether they declare their length or come chunked.

Multipart uploads are read with the `multipart` package's push parser, never Werkzeug's form
parser (`request.files` and `request.form` are not used): that one spools large parts to
temporary files, and compiles two regular expressions for every new boundary; clients draw a
random boundary per request, so that cost ~0.27 ms of every upload (bench/serve_parts.py:
277 us per 812-byte JPEG body against 7 us, 2-core dev machine).
"""

from __future__ import annotations

import io
import json

import multipart
from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from convnet.serve.errors import ApiError

UPLOAD_FIELD = "file"  # the multipart field images arrive in, for predictions and feedback
DRAIN_CHUNK = 64 * 1024  # bytes read at a time when discarding an oversized body
MAX_PART_HEADER = 4096  # bytes in one header line of a multipart part
DRAIN_FACTOR = 4  # discard up to this many times MAX_CONTENT_LENGTH before replying 413

# Content types the JSON protocols accept. TF Serving reads the body as JSON whatever the header
# says, and its own examples use `curl -d`, which sends x-www-form-urlencoded; refusing those
# would break clients that work against TF Serving.
JSON_COMPATIBLE_TYPES = ("", "application/json", "application/x-www-form-urlencoded", "text/plain")


def refuse_oversized_body() -> None:
    """before_request hook: answer 413 for a body over MAX_CONTENT_LENGTH.

    A declared Content-Length is judged before anything is read. A chunked body (no
    Content-Length) is read here, up to one byte past the limit, and handed on as if it had
    declared its length; reading stops there whatever the client still sends.

    An oversized body is read and discarded first, up to DRAIN_FACTOR x the limit in all: a server
    that replies and closes while the client is still sending makes the client see a connection
    reset instead of the 413 and its message, and browsers report that as a bare network error.
    """
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    environ = request.environ
    stream = environ.get("wsgi.input")
    if limit is None or stream is None:
        return
    length = request.content_length
    if length is None and _is_chunked():
        body = _read(stream, limit + 1)
        if len(body) <= limit:
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            del environ["HTTP_TRANSFER_ENCODING"]
            return
        _read(stream, (DRAIN_FACTOR - 1) * limit, keep=False)
        raise RequestEntityTooLarge(
            f"request body is over the limit of {limit} bytes ({limit / 2**20:g} MiB)")
    if length is None or length <= limit:
        return
    _read(stream, min(length, DRAIN_FACTOR * limit), keep=False)
    raise RequestEntityTooLarge(
        f"request body is {length} bytes, the limit is {limit} bytes "
        f"({limit / 2**20:g} MiB)"
    )


def _is_chunked() -> bool:
    # Only a server that ends the stream at the last chunk (wsgi.input_terminated) can be read
    # without a length; Werkzeug reads nothing from the others either.
    return ("chunked" in request.headers.get("Transfer-Encoding", "").lower()
            and bool(request.environ.get("wsgi.input_terminated")))


def _read(stream, limit: int, *, keep: bool = True) -> bytes:
    """Up to `limit` bytes of `stream` (fewer at its end); discarded as read unless `keep`."""
    chunks, remaining = [], limit
    while remaining > 0:
        chunk = stream.read(min(DRAIN_CHUNK, remaining))
        if not chunk:
            break
        remaining -= len(chunk)
        if keep:
            chunks.append(chunk)
    return b"".join(chunks)


def media_type() -> str:
    """The Content-Type without parameters, lower case ('' when absent)."""
    return (request.mimetype or "").lower()


def read_json_body(accepted: tuple[str, ...] = JSON_COMPATIBLE_TYPES):
    """Parse the body as JSON, or raise ApiError 415 (content type) / 400 (syntax)."""
    kind = media_type()
    if kind not in accepted and not kind.endswith("+json"):
        raise ApiError(f"unsupported content type {kind!r}: send application/json", 415)
    return parse_json_object(request.get_data(cache=False))


def parse_json_object(body: bytes | memoryview, what: str = "request body") -> dict:
    """`body` as a JSON object, or ApiError 400 naming `what` it is (the request body, or the
    JSON header of a V2 binary request)."""
    if not body:
        raise ApiError(f"empty {what}: expected a JSON object")
    try:
        # Python's parser accepts NaN and Infinity, as TF Serving's does; tensors reject them later.
        payload = json.loads(bytes(body))
    except UnicodeDecodeError:
        raise ApiError(f"{what} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ApiError(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise ApiError("malformed JSON: nested too deeply") from None
    if not isinstance(payload, dict):
        raise ApiError(f"the JSON body must be an object, not {type(payload).__name__}")
    return payload


def form_parts(max_parts: int) -> list[tuple[str, str, bytes]]:
    """(field name, file name, content) of every part of a multipart/form-data body, in order;
    ApiError 400 for a malformed body or more than `max_parts` parts in all."""
    boundary = request.mimetype_params.get("boundary")
    if not boundary:
        raise ApiError("multipart/form-data without a boundary in its Content-Type header")
    body = request.get_data(cache=False)
    parts: list[tuple[str, str, bytes]] = []
    chunks: list[bytes] = []
    field = name = ""
    try:
        with multipart.PushMultipartParser(boundary, len(body), max_header_size=MAX_PART_HEADER,
                                           max_segment_count=max_parts) as parser:
            for event in parser.parse(body):
                if isinstance(event, multipart.MultipartSegment):
                    chunks, field, name = [], event.name, event.filename or ""
                elif event is None:
                    parts.append((field, name, b"".join(chunks)))
                else:
                    chunks.append(event)
    except multipart.ParserLimitReached as exc:
        raise ApiError(f"multipart body refused: {str(exc).lower()} (at most {max_parts} parts "
                       f"and {MAX_PART_HEADER} bytes per part header line)") from None
    except multipart.MultipartError as exc:
        raise ApiError(f"malformed multipart body: {str(exc).lower()}") from None
    return parts


def files_named(parts: list[tuple[str, str, bytes]], field: str) -> list[tuple[str, bytes]]:
    """(file name, content) of the parts named `field`, leaving out empty nameless ones (what a
    browser sends when no file was chosen)."""
    return [(name, data) for f, name, data in parts if f == field and (data or name)]


def text_field(parts: list[tuple[str, str, bytes]], field: str) -> str | None:
    """The first part named `field` as text (a form's checkbox or input), None if absent."""
    return next((data.decode("utf-8", "replace") for f, _, data in parts if f == field), None)


def form_files(field: str, max_parts: int) -> list[tuple[str, bytes]]:
    """(file name, content) of every part named `field` of a multipart/form-data body, in
    order, as `files_named` keeps them."""
    return files_named(form_parts(max_parts), field)
