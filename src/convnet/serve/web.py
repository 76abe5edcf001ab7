"""The web page: GET / shows the upload form and the model card; POST / is the same form without
JavaScript, answered by the page with the results. With JavaScript, static/app.js takes over and
calls /api/v1/predict per image instead (drag and drop, paste, previews, inline errors). With
several models served, a <select> in the form picks one (`model`, sent with the form; GET
/?model=NAME shows that model's card).
POST /feedback is a result's "Right" / "Wrong, it is X" form (convnet.serve.feedback stores it).
"""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
from flask import Blueprint, current_app, render_template, request
from PIL import Image
from werkzeug.exceptions import HTTPException

from convnet.imaging import ImageError
from convnet.serve.decode import b64_to_bytes, check_count, decode_upload
from convnet.serve.errors import ApiError, describe, extra_headers
from convnet.serve.explain import (
    EXPLAIN_RUNS,
    check_explain_count,
    explanations,
    max_explain_images,
    parse_explain,
)
from convnet.serve.feedback import (
    LABEL_FIELD,
    MAX_FEEDBACK_PARTS,
    NOTE_FIELD,
    PREDICTED_FIELD,
    save_feedback,
    served_model,
)
from convnet.serve.model import LoadedModel
from convnet.serve.pipeline import (
    find_holder,
    get_model,
    infer_scored,
    max_images,
    max_parts,
    metrics,
    registry,
)
from convnet.serve.postprocess import DEFAULT_TOP_K, top_k, unsure_fields
from convnet.serve.uploads import UPLOAD_FIELD, files_named, form_parts, text_field

log = logging.getLogger(__name__)
bp = Blueprint("web", __name__)

EXPLAIN_FIELD = "explain"  # the form's checkbox: show which pixels drove each answer
MODEL_FIELD = "model"  # the form's model picker, and a result's feedback form: the model's name
IMAGE_FIELD, VERDICT_FIELD = "image", "verdict"  # a result's feedback form: its image, the button
THUMBNAIL_PREFIX = "data:image/png;base64,"
MAX_SHOWN_NAME = 80  # characters of a client's file name echoed back (escaped by Jinja)
# The page echoes file names: a strict policy keeps any markup that slipped through inert.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


def _page(results=None, error: str | None = None, status: int = 200, headers=None,
          model: LoadedModel | None = None, notice: str | None = None):
    """The page, describing `model` (the one that answered the results), else the one ?model=
    names (an unknown name: the default one; the error says so), else the default one."""
    served = registry().served
    chosen = served.holders.get(model.name if model else request.args.get(MODEL_FIELD, ""),
                                served.default)
    model = model or chosen.current
    html = render_template(
        "index.html",
        model=model,
        models=served.names,
        chosen=chosen.name,
        load_error=chosen.load_error,
        results=results or [],
        error=error,
        notice=notice,
        feedback=current_app.extensions.get("convnet.feedback") is not None,
        feedback_max=current_app.config["FEEDBACK_MAX_IMAGE_BYTES"],
        max_mb=current_app.config["MAX_CONTENT_LENGTH"] / 1024 / 1024,
        max_images=max_images(),
        max_explain=max_explain_images(),
        explain_runs=EXPLAIN_RUNS,
    )
    status = 503 if model is None and status == 200 else status
    return html, status, {"Content-Security-Policy": CONTENT_SECURITY_POLICY, **(headers or {})}


def _thumbnail(pixels: np.ndarray) -> str:
    """The (S, S, 3) input the model saw, as a PNG data: URL at that size (no JavaScript, so no
    client-side preview)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return THUMBNAIL_PREFIX + base64.b64encode(buffer.getvalue()).decode()


def _shown_name(name: str | None, position: int) -> str:
    name = (name or "").strip() or f"image {position}"
    return name if len(name) <= MAX_SHOWN_NAME else name[: MAX_SHOWN_NAME - 1] + "…"


@bp.get("/")
def index():
    find_holder(request.args.get(MODEL_FIELD) or None)  # a 404 page for an unknown name
    return _page()


@bp.post("/")
def classify_form():
    parts = form_parts(max_parts())
    model = get_model(text_field(parts, MODEL_FIELD) or None)
    uploads = files_named(parts, UPLOAD_FIELD)
    if not uploads:
        raise ApiError("choose one or more images first")
    check_count(len(uploads), max_images())
    explain = parse_explain(text_field(parts, EXPLAIN_FIELD))
    if explain:
        check_explain_count(len(uploads))

    results, good = [], []  # one result per upload, in order; `good` indexes the decodable ones
    for i, (name, data) in enumerate(uploads):
        result = {"name": _shown_name(name, i + 1)}
        try:
            result["pixels"] = decode_upload(data, model.input_size)
            good.append(i)
        except ImageError as exc:
            result["error"], result["status"] = str(exc), exc.status
        results.append(result)

    if good:
        probs, scores = infer_scored(model, np.stack([results[i]["pixels"] for i in good]))
        for i, fields in zip(good, unsure_fields(len(good), scores, model.unsure), strict=True):
            results[i].update(fields)
        if explain:
            pixels = np.stack([results[i]["pixels"] for i in good])
            for i, found in zip(good, explanations(model, pixels, probs), strict=True):
                results[i]["explanation"] = found
        for i, row in zip(good, probs, strict=True):
            results[i]["top_k"] = top_k(row, model.labels, min(DEFAULT_TOP_K, model.num_classes))
            results[i]["thumbnail"] = _thumbnail(results[i].pop("pixels"))
        return _page(results, model=model)
    statuses = {r["status"] for r in results}  # all failed: 413 if all were too big, else 400
    return _page(results, status=statuses.pop() if len(statuses) == 1 else 400, model=model)


@bp.post("/feedback")
def feedback_form():
    """A result's "Right" / "Wrong, it is X" form. It carries the image the model saw (the
    result's S x S PNG, base64): without JavaScript the page cannot send the upload again."""
    metrics().feedback_received.labels("page").inc()
    parts = form_parts(MAX_FEEDBACK_PARTS)
    model = served_model(text_field(parts, MODEL_FIELD) or None)
    image = text_field(parts, IMAGE_FIELD) or ""
    blob = b64_to_bytes(image.removeprefix(THUMBNAIL_PREFIX), "the result's image")
    predicted = text_field(parts, PREDICTED_FIELD)
    right = text_field(parts, VERDICT_FIELD) == "right"
    saved = save_feedback(model, blob, predicted if right else text_field(parts, LABEL_FIELD),
                          predicted=predicted, note=text_field(parts, NOTE_FIELD),
                          source="page")
    return _page(model=model, notice=f"Thank you: saved as {saved['label']!r} "
                                     f"(feedback #{saved['id']}).")


@bp.errorhandler(ApiError)
@bp.errorhandler(ImageError)
@bp.errorhandler(HTTPException)
def page_error(exc):
    message, status = describe(exc)
    return _page(error=message, status=status, headers=extra_headers(exc))


@bp.errorhandler(Exception)
def page_crash(exc):
    log.exception("unhandled error in the web page")
    return _page(error="Something went wrong on the server. Please try again.", status=500)
