"""POST /api/v1/feedback: a person says which class an image really is; the image and the label
are stored (convnet.feedback.store) for `convnet feedback export` and retraining.

    curl -F file=@cat.jpg -F label=cat -F predicted=dog http://127.0.0.1:8000/api/v1/feedback
    curl -H 'Content-Type: application/json' \
         -d '{"b64": "<base64 image>", "label": "cat"}' http://127.0.0.1:8000/api/v1/feedback
    curl -H 'Content-Type: application/json' \
         -d '{"prediction_id": "<from predict?keep=1>", "label": "cat"}' .../api/v1/feedback

By reference: the server keeps no image of a prediction unless the client asks, with
`predict?keep=1`; those images wait in the database (so any worker or replica finds them) for
FEEDBACK_KEEP_SECONDS, at most FEEDBACK_MAX_KEPT at once, and feedback naming one moves it into
the store. Memory holds none of them.

The image goes through the decoder predictions use (format, pixel limit, decode budget) before
anything is written; the label must be one of the served model's classes. The answer (201) comes
after the row is committed. A locked or unreachable database gets 503 with Retry-After, a full
store 507; predictions never touch the database, so they answer either way. The web page's
no-JavaScript form posts to POST /feedback (convnet.serve.web), which ends in `save_feedback`.
"""

from __future__ import annotations

import io
import logging

from flask import Blueprint, current_app, g, request
from PIL import Image

from convnet.feedback.store import (
    FeedbackStore,
    Kept,
    NewFeedback,
    StoreFull,
    StoreUnavailable,
    UnknownPrediction,
)
from convnet.serve.decode import b64_to_bytes, decode_upload
from convnet.serve.errors import ApiError
from convnet.serve.explain import FALSE_VALUES, TRUE_VALUES
from convnet.serve.model import LoadedModel
from convnet.serve.pipeline import find_holder, metrics
from convnet.serve.uploads import (
    UPLOAD_FIELD,
    files_named,
    form_parts,
    media_type,
    read_json_body,
    text_field,
)

log = logging.getLogger(__name__)
bp = Blueprint("feedback", __name__, url_prefix="/api/v1")

LABEL_FIELD, PREDICTED_FIELD, NOTE_FIELD, REFERENCE_FIELD = (
    "label", "predicted", "note", "prediction_id")
MAX_NOTE = 1000  # characters of a person's note
MAX_REFERENCE = 64  # characters of a prediction_id (they are 32)
MAX_FEEDBACK_PARTS = 16  # multipart parts in a feedback body: one image and a few fields
RETRY_AFTER_S = 5  # seconds; a locked SQLite file or a restarting PostgreSQL needs a moment


def feedback_store() -> FeedbackStore:
    found = current_app.extensions.get("convnet.feedback")
    if found is None:
        raise ApiError("feedback is turned off on this server (FEEDBACK_DB is empty)", 404)
    return found


def served_model(name: str | None = None) -> LoadedModel:
    """Model `name`'s newest version (None: ?model=, else the default model), without announcing
    an image to the batcher (feedback runs no model)."""
    found = find_holder(name or request.args.get("model") or None)
    model = found.current
    if model is None:
        raise ApiError(f"no model is loaded: {found.load_error}", 503)
    g.convnet_served = model  # for the access log, as pipeline.get_model does
    return model


def _check_class(value: str | None, model: LoadedModel, field: str, *, required: bool):
    if value is None or value == "":
        if required:
            raise ApiError(f"{field!r} is missing: give one of the model's classes: "
                           f"{', '.join(model.labels)}")
        return None
    if value not in model.labels:
        shown = value if len(value) <= 60 else value[:59] + "…"
        raise ApiError(f"{field} {shown!r} is not one of the model's classes: "
                       f"{', '.join(model.labels)}")
    return value


def _media_type(blob: bytes) -> str:
    with Image.open(io.BytesIO(blob)) as image:  # header only; decode_upload has read it whole
        return Image.MIME.get(image.format or "", "application/octet-stream")


def _check_note(note: str | None) -> str | None:
    note = (note or "").strip() or None
    if note is not None and len(note) > MAX_NOTE:
        raise ApiError(f"note is {len(note)} characters, the limit is {MAX_NOTE}")
    return note


def _check_size(blob: bytes) -> None:
    limit = current_app.config["FEEDBACK_MAX_IMAGE_BYTES"]
    if len(blob) > limit:
        raise ApiError(f"image is {len(blob)} bytes, the limit for feedback is {limit}", 413)


def _unavailable(exc: StoreUnavailable) -> ApiError:
    log.warning("feedback store unavailable: %s", exc)  # the detail is for the log only
    metrics().feedback_failures.inc()
    return ApiError("the feedback store is unavailable (database locked or unreachable); "
                    f"nothing was stored, retry in {RETRY_AFTER_S} s", 503,
                    {"Retry-After": str(RETRY_AFTER_S)})


def _answer(item_id: int, label: str, predicted: str | None, name: str, version: int) -> dict:
    return {"id": item_id, "label": label, "predicted": predicted,
            "correct": None if predicted is None else predicted == label,
            "model": name, "version": version}


def save_feedback(model: LoadedModel, blob: bytes, label: str | None, *, predicted=None,
                  note=None, source: str = "api") -> dict:
    """Validate and store one item; the answer's body. Raises ApiError / ImageError."""
    store = feedback_store()
    label = _check_class(label, model, LABEL_FIELD, required=True)
    predicted = _check_class(predicted, model, PREDICTED_FIELD, required=False)
    note = _check_note(note)
    _check_size(blob)
    decode_upload(blob, model.input_size)  # the same checks as a prediction's image
    item = NewFeedback(label=label, image=blob, media_type=_media_type(blob),
                       model_name=model.name, model_version=model.version, source=source,
                       predicted=predicted, note=note)
    try:
        item_id = store.add(item)
    except StoreFull as exc:
        raise ApiError(f"{exc}; nothing was stored", 507) from None
    except StoreUnavailable as exc:
        raise _unavailable(exc) from None
    metrics().feedback_stored.labels(source).inc()
    return _answer(item_id, label, predicted, model.name, model.version)


def save_by_reference(model: LoadedModel, prediction_id: str, label: str | None,
                      note: str | None) -> dict:
    """Feedback on an image kept by predict?keep=1."""
    store = feedback_store()
    label = _check_class(label, model, LABEL_FIELD, required=True)
    note = _check_note(note)
    if len(prediction_id) > MAX_REFERENCE:
        raise ApiError(f"unknown prediction_id: ids are {MAX_REFERENCE} characters at most", 404)
    try:
        item_id, item = store.add_kept(prediction_id, label, note, keep_seconds())
    except UnknownPrediction:
        raise ApiError("unknown prediction_id: never kept (predict?keep=1), answered already, "
                       f"or older than {keep_seconds():g} s", 404) from None
    except StoreFull as exc:
        raise ApiError(f"{exc}; nothing was stored", 507) from None
    except StoreUnavailable as exc:
        raise _unavailable(exc) from None
    metrics().feedback_stored.labels("api").inc()
    return _answer(item_id, label, item.predicted, item.model_name, item.model_version)


def keep_seconds() -> float:
    return current_app.config["FEEDBACK_KEEP_SECONDS"]


def parse_keep(value: str | None) -> bool:
    """The `keep` query parameter of predict: 1/true/yes/on, or 0/false/no/off/absent."""
    text = (value or "").strip().lower()
    if text in TRUE_VALUES or text in FALSE_VALUES:
        return text in TRUE_VALUES
    raise ApiError(f"keep must be 1 or 0 (true or false), got {value!r}")


def keep_predictions(model: LoadedModel, blobs: list[bytes], answers: list[dict]) -> dict:
    """predict?keep=1: keep the (decoded, so valid) images and give each answer its
    prediction_id. The prediction answers whatever happens here: a failure to keep is told in
    `kept_error`, and no answer gets an id."""
    try:
        store = feedback_store()
        for blob in blobs:
            _check_size(blob)
        ids = store.keep([Kept(predicted=answer["label"], model_name=model.name,
                               model_version=model.version, media_type=_media_type(blob),
                               image=blob) for blob, answer in zip(blobs, answers, strict=True)],
                         current_app.config["FEEDBACK_MAX_KEPT"], keep_seconds())
    except (ApiError, StoreFull) as exc:
        return {"kept": False, "kept_error": str(exc)}
    except StoreUnavailable as exc:
        return {"kept": False, "kept_error": _unavailable(exc).message}
    for answer, prediction_id in zip(answers, ids, strict=True):
        answer["prediction_id"] = prediction_id
    return {"kept": True}


def _text(value, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ApiError(f"{field} must be a string, not {type(value).__name__}")
    return value


def _request_fields() -> tuple[bytes | None, dict]:
    """(image bytes or None, {label, predicted, note, prediction_id}) from a multipart or JSON
    body: an image or a prediction_id, not both."""
    kind = media_type()
    names = (LABEL_FIELD, PREDICTED_FIELD, NOTE_FIELD, REFERENCE_FIELD)
    if kind == "multipart/form-data":
        parts = form_parts(MAX_FEEDBACK_PARTS)
        files = files_named(parts, UPLOAD_FIELD)
        fields = {n: text_field(parts, n) for n in names}
        if fields[REFERENCE_FIELD] is not None and not files:
            return None, fields
        if len(files) != 1 or fields[REFERENCE_FIELD] is not None:
            raise ApiError(f"send exactly one image as the file field {UPLOAD_FIELD!r} "
                           f"(got {len(files)}), or a {REFERENCE_FIELD!r} instead")
        return files[0][1], fields
    if kind == "application/json" or kind.endswith("+json"):
        body = read_json_body(("application/json",))
        fields = {n: _text(body.get(n), n) for n in names}
        if ("b64" in body) == (fields[REFERENCE_FIELD] is not None):
            raise ApiError('expected {"b64": "<base64 image>", "label": "<class>"} or '
                           '{"prediction_id": "<from predict?keep=1>", "label": "<class>"}')
        if "b64" not in body:
            return None, fields
        return b64_to_bytes(body["b64"], "b64"), fields
    raise ApiError(f"unsupported content type {kind or '(none)'!r}: send multipart/form-data "
                   "with a 'file' and a 'label' field, or application/json", 415)


@bp.post("/feedback")
def feedback():
    metrics().feedback_received.labels("api").inc()
    model = served_model()
    blob, fields = _request_fields()
    if blob is None:
        return save_by_reference(model, fields[REFERENCE_FIELD], fields[LABEL_FIELD],
                                 fields[NOTE_FIELD]), 201
    return save_feedback(model, blob, fields[LABEL_FIELD], predicted=fields[PREDICTED_FIELD],
                         note=fields[NOTE_FIELD]), 201
