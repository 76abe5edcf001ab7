"""KServe V2's binary tensor data extension: tensors as raw bytes after the JSON, not as JSON
numbers inside it. tritonclient's `InferInput.set_data_from_numpy` sends inputs this way by
default, and its `infer` asks for binary outputs unless told otherwise.

A binary body is `JSON header | bytes of tensor 1 | bytes of tensor 2 | ...`, and the HTTP header
`Inference-Header-Content-Length: N` says the JSON is its first N bytes. A tensor sent binary
carries `"parameters": {"binary_data_size": K}` instead of `data`, and its K bytes follow in the
order of the tensors: row-major, little-endian, each element of a BYTES tensor a 4-byte
little-endian length and that many bytes. An answer has the same layout when a request asks for
it, per output (`"parameters": {"binary_data": true}`) or for all (`binary_data_output`).

Only this module knows the layout: v2.py gets the JSON header and, per input, its bytes.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
from flask import Response, request

from convnet.serve.errors import ApiError
from convnet.serve.uploads import (
    JSON_COMPATIBLE_TYPES,
    media_type,
    parse_json_object,
    read_json_body,
)

HEADER_LENGTH = "Inference-Header-Content-Length"  # bytes of JSON at the start of the body
BINARY_TYPE = "application/octet-stream"  # what Triton's examples send and answer
# Bytes per element of each V2 datatype; BYTES elements vary (LENGTH_PREFIX + their length).
ELEMENT_SIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1,
                "INT16": 2, "INT32": 4, "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8, "BF16": 2}
NUMPY_TYPES = {"UINT8": "<u1", "FP32": "<f4"}  # the fixed-size datatypes v2.py takes
LENGTH_PREFIX = struct.Struct("<I")  # before each BYTES element: its length, uint32


def read_infer_body() -> tuple[dict, list[memoryview | None]]:
    """The JSON request and, per input, its binary data (None where it came as JSON `data`).

    Without Inference-Header-Content-Length the body is plain JSON, read as every JSON door
    reads it. With it, each binary input's bytes are cut from the rest of the body and checked
    against its shape and datatype; ApiError 400 says which input and what does not add up.
    """
    declared = request.headers.get(HEADER_LENGTH)
    if declared is None:
        return read_json_body(), []
    kind = media_type()
    if kind not in (*JSON_COMPATIBLE_TYPES, BINARY_TYPE) and not kind.endswith("+json"):
        raise ApiError(f"unsupported content type {kind!r} for a binary request: send "
                       f"{BINARY_TYPE} or application/json", 415)
    body = memoryview(request.get_data(cache=False))
    # int() of a header of thousands of digits raises; 19 digits outgrow any body already.
    if not (declared.isascii() and declared.isdigit() and len(declared) < 20):
        raise ApiError(f"{HEADER_LENGTH} must be a whole number of bytes, not {declared!r}")
    length = int(declared)
    if length > len(body):
        raise ApiError(f"{HEADER_LENGTH} is {length} bytes, but the body holds only "
                       f"{len(body)}")
    payload = parse_json_object(body[:length], f"JSON header (the first {length} bytes)")
    return payload, split_inputs(payload.get("inputs"), body[length:])


def split_inputs(inputs, tail: memoryview) -> list[memoryview | None]:
    """Per input, its `binary_data_size` bytes of `tail` in input order (None for a JSON one);
    every byte of `tail` must belong to one. Inputs that are not objects are left for v2.py to
    refuse."""
    if not isinstance(inputs, list):
        inputs = []
    pieces: list[memoryview | None] = []
    offset = 0
    for i, tensor in enumerate(inputs):
        size = binary_size(tensor, f"inputs[{i}]") if isinstance(tensor, dict) else None
        if size is None:
            pieces.append(None)
            continue
        left = len(tail) - offset
        if size > left:
            raise ApiError(f"inputs[{i}]: binary_data_size is {size} bytes, but only {left} "
                           "are left in the body after the JSON header and earlier inputs")
        pieces.append(tail[offset:offset + size])
        offset += size
    if offset != len(tail):
        raise ApiError(f"{len(tail) - offset} trailing bytes after the JSON header and the "
                       "binary inputs: the inputs' binary_data_size add up to "
                       f"{offset} bytes, the body holds {len(tail)} after the header")
    return pieces


def binary_size(tensor: dict, where: str) -> int | None:
    """The tensor's `binary_data_size` (None if it has none), checked against its shape and
    datatype: exactly shape x element size, or for BYTES room for every length prefix."""
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ApiError(f"{where}.parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ApiError(f"{where}.parameters.binary_data_size must be a whole number of bytes")
    if "data" in tensor:
        raise ApiError(f"{where} has both data and parameters.binary_data_size: send one")
    datatype = tensor.get("datatype")
    if datatype != "BYTES" and datatype not in ELEMENT_SIZE:
        raise ApiError(f"{where}.datatype {datatype!r} is not a V2 datatype, so its binary data "
                       f"cannot be read (known: {', '.join([*ELEMENT_SIZE, 'BYTES'])})")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ApiError(f"{where}.shape must be a list of non-negative integers")
    count = math.prod(shape)
    if datatype == "BYTES":
        if size < count * LENGTH_PREFIX.size:
            raise ApiError(f"{where}: binary_data_size {size} is too small for shape {shape} of "
                           f"BYTES ({LENGTH_PREFIX.size} bytes of length before each of "
                           f"{count} elements)")
    elif size != count * ELEMENT_SIZE[datatype]:
        raise ApiError(f"{where}: binary_data_size is {size} bytes, but shape {shape} of "
                       f"{datatype} ({ELEMENT_SIZE[datatype]} bytes each) takes "
                       f"{count * ELEMENT_SIZE[datatype]}")
    return size


def tensor_array(raw: memoryview, datatype: str, shape: list[int]) -> np.ndarray:
    """Binary data of a UINT8 or FP32 tensor (its size already checked) -> array of `shape`,
    sharing the request body's memory."""
    return np.frombuffer(raw, dtype=NUMPY_TYPES[datatype]).reshape(shape)


def bytes_elements(raw: memoryview, count: int, where: str) -> list[bytes]:
    """Binary data of a BYTES tensor -> its `count` elements. Called only once the count is
    known to be small (at most MAX_IMAGES_PER_REQUEST), so the loop stays short."""
    elements, offset = [], 0
    for i in range(count):
        if offset + LENGTH_PREFIX.size > len(raw):
            raise ApiError(f"{where}: binary data ends before the length of element {i}")
        (length,) = LENGTH_PREFIX.unpack_from(raw, offset)
        offset += LENGTH_PREFIX.size
        if offset + length > len(raw):
            raise ApiError(f"{where}: element {i} is {length} bytes long, but only "
                           f"{len(raw) - offset} of binary_data_size are left")
        elements.append(bytes(raw[offset:offset + length]))
        offset += length
    if offset != len(raw):
        raise ApiError(f"{where}: {len(raw) - offset} trailing bytes after the {count} BYTES "
                       "elements of its shape: binary_data_size does not match them")
    return elements


def binary_answer(header: dict, outputs: list[tuple[dict, np.ndarray]]) -> Response:
    """An inference answer with each output's data as raw bytes after the JSON header.
    outputs: (the output's JSON description without data, its little-endian array)."""
    for description, array in outputs:
        description["parameters"] = {"binary_data_size": array.nbytes}
    header["outputs"] = [description for description, _ in outputs]
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join([head, *(np.ascontiguousarray(array).tobytes() for _, array in outputs)])
    response = Response(body, content_type=BINARY_TYPE)
    response.headers[HEADER_LENGTH] = str(len(head))
    return response
