"""A generated corpus of hostile requests for the real-server tests: bombs, corrupt files, things
that are not images, oversized and malformed bodies, and bad tensors for the TF Serving and V2
routes. Nothing here is read from disk; every input is built in memory, in under a second.

Each `Probe` says which statuses are acceptable: almost always one 4xx, never a 5xx.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

BOUNDARY = "hostile-boundary-7d1e"
MODEL = "cifar10"  # the served name of conftest's model root


@dataclass(frozen=True)
class Probe:
    name: str
    path: str
    content: bytes | Callable[[], bytes]  # the body, or how to make it (built on first use)
    headers: dict = field(default_factory=dict)
    statuses: tuple[int, ...] = (400,)  # acceptable answers
    method: str = "POST"
    heavy: bool = False  # too slow or large to repeat in the soak

    @functools.cached_property
    def body(self) -> bytes:
        return self.content if isinstance(self.content, bytes) else self.content()

    def __repr__(self) -> str:  # pytest ids and failure messages stay short
        return f"Probe({self.name})"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png(width: int, height: int, *, color_type: int = 0, bit_depth: int = 1,
        extra_chunks: bytes = b"", rows: int | None = None) -> bytes:
    """A real PNG of zero pixels, compressed row by row so no big buffer is ever built.
    color_type: 0 grey, 2 RGB, 4 grey + alpha, 6 RGBA.
    rows: how many rows of pixel data to include (fewer than `height` makes it truncated)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\x00" * (1 + (width * channels * bit_depth + 7) // 8)  # filter byte + pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height if rows is None else rows))
    data += packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra_chunks
            + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b""))


def ztxt_bomb() -> bytes:
    """A 1x1 PNG carrying a compressed text chunk that inflates to 64 MiB."""
    packer = zlib.compressobj(9)
    text = b"".join(packer.compress(b"\x00" * 2**20) for _ in range(64)) + packer.flush()
    return png(1, 1, extra_chunks=png_chunk(b"zTXt", b"Comment\x00\x00" + text))


def gif_screen(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width x height, holding one 1x1 frame."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00" * 6
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b"\x3b"


def noise_png(side: int = 64, seed: int = 0) -> bytes:
    """A side x side PNG of random pixels: it barely compresses, so cutting it truncates pixels."""
    noise = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(color=(255, 0, 0), size=(32, 32), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def multipart(parts: list[tuple[bytes, bytes]], field_name: bytes = b"file") -> tuple[bytes, dict]:
    """(body, headers) for multipart parts given as (filename bytes, content)."""
    chunks = [b"--" + BOUNDARY.encode() + b"\r\nContent-Disposition: form-data; name=\""
              + field_name + b"\"; filename=\"" + filename + b"\"\r\n"
              b"Content-Type: image/jpeg\r\n\r\n" + content + b"\r\n"
              for filename, content in parts]
    body = b"".join(chunks) + b"--" + BOUNDARY.encode() + b"--\r\n"
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def browser_form(parts: list[tuple[bytes, bytes]]) -> dict:
    """Flask test-client keyword arguments for a multipart body shaped as a browser sends it
    (Werkzeug's own encoder drops the CRLF before the delimiter after an empty file, which a
    strict parser refuses)."""
    body, headers = multipart(parts)
    return {"data": body, "content_type": headers["Content-Type"]}


def image_probe(name: str, data: bytes, statuses=(400,), content_type="image/jpeg",
                **kwargs) -> Probe:
    return Probe(name, "/api/v1/predict", data, {"Content-Type": content_type}, statuses,
                 **kwargs)


def json_probe(name: str, path: str, payload, statuses=(400,), **kwargs) -> Probe:
    body = payload if isinstance(payload, bytes | Callable) else json.dumps(payload).encode()
    return Probe(name, path, body, {"Content-Type": "application/json"}, statuses, **kwargs)


def build_corpus() -> list[Probe]:
    jpeg = encoded(fmt="JPEG")
    png_ok = encoded(fmt="PNG")
    noisy = noise_png()
    b64 = base64.b64encode(jpeg).decode()
    tfs = f"/v1/models/{MODEL}:predict"
    v2 = f"/v2/models/{MODEL}/infer"
    nan_image = np.full((32, 32, 3), 1.0).tolist()
    nan_image[3][4][1] = float("nan")
    corrupt_png = bytearray(png_ok)
    corrupt_png[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    thousand, thousand_headers = multipart([(b"a.jpg", jpeg)] * 1000)
    long_name, long_headers = multipart([(b"x" * 20_000 + b".jpg", b"<html>")])
    bad_utf8, bad_utf8_headers = multipart([(b"\xff\xfe\xc3(\x80.jpg", b"GIF89a garbage")])
    return [
        # Decompression bombs and huge images: refused from the header, before any decoding.
        image_probe("png 20000x20000 (tiny compressed)", lambda: png(20_000, 20_000), (413,),
                    "image/png", heavy=True),
        image_probe("png header 100000x100000, no pixels", png(100_000, 100_000, rows=0), (413,),
                    "image/png"),
        image_probe("png text-chunk bomb (64 MiB zTXt)", ztxt_bomb, (400,), "image/png",
                    heavy=True),
        # Big but within MAX_IMAGE_PIXELS (40 M): decoded for real, so it tests the memory bound.
        image_probe("png 6000x6000 (36 Mpx, under the limit)",
                    lambda: png(6000, 6000, color_type=2, bit_depth=8), (200,), "image/png",
                    heavy=True),
        image_probe("gif 65535x65535 screen", gif_screen(65_535, 65_535), (413,), "image/gif"),
        image_probe("gif 20000x20000 screen", gif_screen(20_000, 20_000), (413,), "image/gif"),
        # Broken files.
        image_probe("truncated jpeg", jpeg[: len(jpeg) // 2]),
        image_probe("jpeg header then garbage", jpeg[:2] + bytes(range(256)) * 8),
        image_probe("truncated png", noisy[: len(noisy) // 2], content_type="image/png"),
        # Pillow fills the missing rows with zeros; imaging counts the inflated bytes and refuses.
        image_probe("png with 100 of 300 rows", png(300, 300, color_type=2, bit_depth=8,
                                                   rows=100), (400,), "image/png"),
        image_probe("png with a bad IHDR checksum", bytes(corrupt_png), content_type="image/png"),
        image_probe("zero bytes", b""),
        # Not images at all, whatever the header says.
        image_probe("html as image/jpeg", b"<!doctype html><html><body><h1>hi</h1></body></html>"),
        image_probe("script as image/jpeg", b"<script>alert(document.cookie)</script>"),
        image_probe("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32">'
                    b'<rect width="32" height="32" fill="red"/></svg>',
                    content_type="image/svg+xml"),
        image_probe("text/plain body", b"hello", (415,), "text/plain"),
        # Bodies that are too big or have too many parts (this one is 0.7 MB: too many parts).
        Probe("multipart with 1000 parts", "/api/v1/predict", thousand, thousand_headers,
              (400,), heavy=True),
        image_probe("50 MB body", lambda: bytes(50 * 2**20), (413,), heavy=True),
        # Hostile file names: never echoed, never used.
        Probe("20000-byte file name", "/api/v1/predict", long_name, long_headers, (400,)),
        Probe("invalid utf-8 file name", "/api/v1/predict", bad_utf8, bad_utf8_headers, (400,)),
        # Malformed JSON on every JSON door.
        json_probe("malformed json (api)", "/api/v1/predict", b'{"instances": [{"b64": '),
        json_probe("malformed json (tf serving)", tfs, b"{instances: nope}"),
        json_probe("malformed json (v2)", v2, b'{"inputs": [}'),
        json_probe("json nested 100000 deep", tfs, b"[" * 100_000 + b"]" * 100_000),
        json_probe("invalid utf-8 in json", v2, b'{"id": "\xff\xfe"}'),
        json_probe("bad base64 (api)", "/api/v1/predict", {"instances": [{"b64": "%%%not"}]}),
        # TF Serving: wrong shapes, types, values.
        json_probe("tfs wrong shape", tfs, {"instances": [[[1, 2, 3]]]}),
        json_probe("tfs strings as pixels", tfs, {"instances": [[["a"] * 3] * 32] * 1}),
        json_probe("tfs NaN pixel", tfs, {"instances": [nan_image]}),
        json_probe("tfs pixel 300", tfs, {"instances": [np.full((32, 32, 3), 300).tolist()]}),
        json_probe("tfs 1e308 * 10 overflow", tfs, b'{"instances": [1e309]}'),
        json_probe("tfs instances not a list", tfs, {"instances": "all of them"}),
        json_probe("tfs both instances and inputs", tfs, {"instances": [], "inputs": []}),
        json_probe("tfs 65 images", tfs, {"instances": [{"b64": b64}] * 65}),
        json_probe("tfs 5 million zeros", tfs,
                   lambda: b'{"instances": [' + b"0," * 4_999_999 + b"0]}", heavy=True),
        json_probe("tfs unknown model", "/v1/models/nope:predict", {"instances": []}, (404,)),
        # V2: wrong datatypes, shapes, data.
        json_probe("v2 FP64 datatype", v2, {"inputs": [
            {"name": "x", "shape": [1, 32, 32, 3], "datatype": "FP64", "data": [0] * 3072}]}),
        json_probe("v2 shape and data disagree", v2, {"inputs": [
            {"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 10}]}),
        json_probe("v2 NaN in FP32", v2, {"inputs": [
            {"name": "x", "shape": [1, 32, 32, 3], "datatype": "FP32",
             "data": [float("nan")] * 3072}]}),
        json_probe("v2 huge batch dimension", v2, {"inputs": [
            {"name": "x", "shape": [2**62, 32, 32, 3], "datatype": "UINT8", "data": [0]}]}),
        json_probe("v2 negative shape", v2, {"inputs": [
            {"name": "x", "shape": [-1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}]}),
        json_probe("v2 bytes that are not base64", v2, {"inputs": [
            {"name": "x", "shape": [1], "datatype": "BYTES", "data": ["<html>"]}]}),
        json_probe("v2 bytes of an html page", v2, {"inputs": [
            {"name": "x", "shape": [1], "datatype": "BYTES",
             "data": [base64.b64encode(b"<html></html>").decode()]}]}),
        json_probe("v2 inputs missing", v2, {"outputs": []}),
        json_probe("v2 two inputs", v2, {"inputs": [{}, {}]}),
        json_probe("v2 unknown version", f"/v2/models/{MODEL}/versions/abc/infer",
                   {"inputs": []}, (404,)),
    ]


GOOD_COLORS = {"airplane": (255, 0, 0), "automobile": (0, 255, 0), "bird": (0, 0, 255)}


def good_probes() -> list[tuple[Probe, str]]:
    """Valid requests for the tiny model in conftest, with the label each must get."""
    probes = []
    for label, color in GOOD_COLORS.items():
        for fmt, kind in (("JPEG", "image/jpeg"), ("PNG", "image/png")):
            data = encoded(color, (48, 40), fmt)
            probes.append((image_probe(f"{label} {fmt}", data, (200,), kind), label))
        body, headers = multipart([(b"photo.jpg", encoded(color))])
        probes.append((Probe(f"{label} multipart", "/api/v1/predict", body, headers, (200,)),
                       label))
        b64 = base64.b64encode(encoded(color, fmt="PNG")).decode()
        probes.append((json_probe(f"{label} tfs b64", f"/v1/models/{MODEL}:predict",
                                  {"instances": [{"b64": b64}]}, (200,)), label))
    return probes
