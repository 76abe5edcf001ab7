"""Step 1 of serving: whatever a protocol carries -> uint8 (N, S, S, 3), or a 4xx saying why.

S is the input size of the model the request holds (`LoadedModel.input_size`): each request
decodes for the model it will run on, so a hot swap to a model of another size is harmless.
Two kinds of input reach here: encoded images (multipart files, raw bodies, base64 strings), which
all go through `convnet.imaging.decode_image`, and pixel tensors given as JSON numbers (TF Serving
instances, V2 UINT8/FP32 tensors), which are checked for shape, type and range.

Each request is bounded (MAX_CONTENT_LENGTH, MAX_IMAGE_PIXELS); `DecodeBudget` bounds their sum:
the pixels a worker's threads hold decoded at once. An image that would overdraw it is refused
with 503 and Retry-After before any of its pixels are decoded.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from convnet.imaging import ImageError, decode_image
from convnet.serve.errors import ApiError
from convnet.serve.pipeline import decode_budget, max_pixels

RETRY_AFTER_S = 1  # a 40 Mpx image decodes in about a second on one core of the dev machine


class DecodeBudget:
    """Pixels one worker may hold decoded at once, summed over its threads.

    Decoding costs 4 to 16 bytes per pixel at its peak, by format (RGB PNG 4, RGBA PNG 8, grey
    with alpha 12, WebP 16; JPEG decodes at a reduced scale and costs far fewer pixels), so a
    worker's decoding never holds more than 16 x `capacity` bytes.
    """

    def __init__(self, capacity: int, on_refuse: Callable[[], None] = lambda: None):
        self.capacity = capacity
        self.in_use = 0  # pixels reserved now
        self._on_refuse = on_refuse
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """Hold `pixels` of the budget for the block, or raise ApiError 503 if they do not fit.
        Never waits: a thread queueing here would hold its request body meanwhile."""
        with self._lock:
            fits = self.in_use + pixels <= self.capacity
            if fits:
                self.in_use += pixels
        if not fits:
            self._on_refuse()
            raise ApiError(
                "server busy: it is decoding as many large images as it may at once; "
                f"retry in {RETRY_AFTER_S} s",
                503,
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        try:
            yield
        finally:
            with self._lock:
                self.in_use -= pixels


def decode_upload(blob: bytes, size: int) -> np.ndarray:
    """One encoded image -> (size, size, 3) uint8, within this app's pixel limit and decode
    budget."""
    return decode_image(blob, max_pixels=max_pixels(), size=size,
                        reserve=decode_budget().reserve)


def check_count(count: int, cap: int) -> None:
    if count == 0:
        raise ApiError("no images in the request")
    if count > cap:
        raise ApiError(f"too many images: {count} in one request, the limit is {cap}")


def b64_to_bytes(value, where: str) -> bytes:
    """Strict base64 (standard or URL-safe alphabet, padding optional) -> bytes."""
    if not isinstance(value, str):
        raise ApiError(f"{where}: base64 data must be a string, not {type(value).__name__}")
    text = "".join(value.split())  # line breaks, as MIME encoders insert, are harmless
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(f"{where}: invalid base64 data") from None


def decode_images(blobs: Sequence[bytes], size: int) -> np.ndarray:
    """Encoded images -> (N, size, size, 3) uint8, one after the other. An error names the image
    by position (never by the client's file name) and keeps imaging's status (413 for too many
    pixels)."""
    pixels = np.empty((len(blobs), size, size, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        try:
            pixels[i] = decode_upload(blob, size)
        except ImageError as exc:
            if len(blobs) == 1:
                raise
            raise ImageError(f"image {i + 1} of {len(blobs)}: {exc}", exc.status) from None
    return pixels


def pixels_from_numbers(
    data, where: str, size: int, *, whole: bool = True, single: bool = False,
    shape: list | None = None,
) -> np.ndarray:
    """Nested JSON numbers -> uint8 (N, size, size, 3); `single` takes one (size, size, 3) image.

    whole: insist on integers, as a uint8 tensor must hold; otherwise (FP32 input) values are
    rounded to the nearest integer, since the model itself eats uint8.
    shape: the declared shape of flat (or nested) `data`, as the V2 protocol sends it.
    """
    image_shape = (size, size, 3)
    want = f"[{size}, {size}, 3]" if single else f"[N, {size}, {size}, 3]"
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ApiError(f"{where}: expected a nested list of numbers with shape {want}") from None
    if array.dtype.kind not in "iuf":
        raise ApiError(
            f"{where}: expected numbers with shape {want}, got values of type "
            f"{_kind_name(array)}"
        )
    if shape is not None:
        if array.size != int(np.prod(shape)):
            raise ApiError(
                f"{where}: {array.size} values do not fill the declared shape {list(shape)}"
            )
        array = array.reshape(shape)
    expected_ndim = 3 if single else 4
    if array.ndim != expected_ndim or tuple(array.shape[-3:]) != image_shape:
        raise ApiError(f"{where}: shape {list(array.shape)}, expected {want}")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise ApiError(f"{where}: values must be finite numbers (found NaN or Infinity)")
        if whole and not np.all(array == np.round(array)):
            raise ApiError(f"{where}: pixel values must be whole numbers 0..255 (uint8)")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ApiError(
            f"{where}: pixel values must be in 0..255, found {array.min():g}..{array.max():g}"
        )
    pixels = np.rint(array) if array.dtype.kind == "f" else array
    pixels = pixels.astype(np.uint8)
    return pixels[None] if single else pixels


def _kind_name(array: np.ndarray) -> str:
    return {"b": "boolean", "U": "string", "S": "string", "O": "mixed or out-of-range"}.get(
        array.dtype.kind, str(array.dtype)
    )
