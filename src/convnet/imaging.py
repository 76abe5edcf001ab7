"""Turn one encoded image (bytes) into the pixels a model eats: uint8 (S, S, 3).

S is the model's input size, which each model directory fixes (`convnet.modeldir.image_size`):
32 for CIFAR-10 and the bundled model (`SIZE`, the default), often 64 to 224 for photos. The same
function serves every door: the web form, the JSON and TF Serving APIs, the V2 protocol,
`convnet predict`, `convnet evaluate` and the image-folder dataset loader, so an upload and a
training image are prepared identically, at the size of the model that will see them.

Policy, in order, the same for every S:
1. Only JPEG, PNG, GIF (first frame), BMP and WebP are opened; anything else is refused.
2. The pixel count is read from the header and checked against a limit *before* decoding, so a
   decompression bomb costs nothing.
3. A JPEG is decoded at the smallest of 1/8, 1/4, 1/2 or full scale that still leaves at least
   2S pixels on each side (libjpeg's draft mode): a 40 Mpx photo costs 1/64 of its pixels for
   any S up to 1/16 of its shorter side. Other formats decode whole. Either way, what is
   decoded is counted before decoding (`reserve`), so a caller can bound the memory of many
   decodes at once; resizing to S x S adds only about S x (its shorter side) pixels.
4. EXIF orientation is applied, any mode becomes RGB (transparency is composited onto white).
5. The largest centred square is cropped and resized to S x S with a Lanczos filter, shrinking
   or enlarging as needed. An image that is already S x S passes through untouched.

Most uploads to a thumbnail model are small JPEGs without EXIF (a CIFAR image is 32 x 32): those
that need no reduced-scale decoding are decoded by libjpeg-turbo through simplejpeg, straight
to RGB, about 7x faster than through Pillow's Python-level file parsing (11 against 78 us for a
32 x 32 JPEG on the dev machine) and pixel for pixel the same (tests/test_imaging.py). Anything
else, and any JPEG simplejpeg does not decode cleanly, takes Pillow's path, whose errors say
what is wrong.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE = 32  # default `size`, pixels: the side of CIFAR-10 images and of the bundled model
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
MAX_PIXELS = 40_000_000  # default bomb limit: width * height from the header


PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
ADAM7_PASSES = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                (1, 0, 2, 2), (0, 1, 1, 2))  # interlaced PNG: (x0, y0, dx, dy) per pass
INFLATE_STEP = 1 << 20  # bytes inflated at a time when checking a PNG: memory stays bounded


class ImageError(ValueError):
    """An input that is not a usable image. `status` is the HTTP code it deserves."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        # Pasting through the alpha band onto white gives what alpha_composite onto opaque white
        # gives, pixel for pixel, without its two extra full-size RGBA copies: a 40 Mpx RGBA
        # image peaks at 8 bytes per pixel instead of 20.
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba)
        return rgb
    if img.mode.startswith("I"):
        # 16-bit greyscale (PNG) opens as "I;16" or "I": Pillow's own conversion clips every
        # value above 255 to white, so keep the top 8 of the 16 bits instead.
        deep = np.asarray(img).astype(np.uint32) >> 8
        return Image.fromarray(np.minimum(deep, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def _png_pixel_bytes(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes the inflated IDAT stream must hold: one filter byte plus the packed pixels per row."""
    def size(w: int, h: int) -> int:
        return h * (1 + (w * bits_per_pixel + 7) // 8) if w and h else 0

    if not interlaced:
        return size(width, height)
    return sum(size((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy)
               for x0, y0, dx, dy in ADAM7_PASSES)


def _check_png_complete(data: bytes) -> None:
    """Raise ImageError if a PNG's pixel stream stops before its last row.

    Pillow decodes such a file without complaint and fills the missing rows with zeros, so a
    truncated upload would be classified as if it were whole. Counting the inflated bytes costs
    one more pass of zlib over the image.
    """
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    bits_per_pixel = PNG_SAMPLES.get(colour, 4) * depth
    expected = _png_pixel_bytes(width, height, bits_per_pixel, interlace == 1)
    inflater, produced, pos = zlib.decompressobj(), 0, 8
    try:
        while pos + 8 <= len(data) and produced < expected:
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            if kind == b"IDAT":
                pending = data[pos + 8 : pos + 8 + length]
                while pending and produced < expected:
                    produced += len(inflater.decompress(pending, INFLATE_STEP))
                    pending = inflater.unconsumed_tail
            elif kind == b"IEND":
                break
            pos += 12 + length  # length, type, data, CRC
    except zlib.error as exc:
        raise ImageError(f"corrupt PNG image: {exc}") from None
    if produced < expected:
        raise ImageError(
            f"corrupt or truncated PNG image: its pixel data ends early ({produced} of "
            f"{expected} bytes)"
        )


# pixels about to be decoded -> a context manager held while they are in memory
Reserve = Callable[[int], contextlib.AbstractContextManager]


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, size: int = SIZE,
                 reserve: Reserve | None = None) -> np.ndarray:
    """Decode `data` to a uint8 array (size, size, 3) or raise ImageError saying what is wrong.

    reserve: called with the number of pixels the decoder is about to allocate (the header's
    width x height, less where JPEG decodes at a reduced scale) before any pixel is decoded; the
    context manager it returns is held until those pixels are freed again. The server bounds
    the pixels its threads hold at once with it; what it raises propagates unchanged.
    """
    fast = _plain_jpeg(data, max_pixels, size)
    if fast is not None:
        with reserve(fast[0] * fast[1]) if reserve else contextlib.nullcontext():
            rgb = _decode_plain_jpeg(data)
            if rgb is not None:
                return rgb if rgb.shape[:2] == (size, size) else _fit(Image.fromarray(rgb), size)
    img = _open(data, max_pixels, size)
    width, height = img.size
    with reserve(width * height) if reserve else contextlib.nullcontext():
        try:
            return _to_model_input(img, data, size)
        finally:
            img.close()  # frees the full-size pixels now, not when a traceback lets go of them


def _open(data: bytes, max_pixels: int, size: int) -> Image.Image:
    """Read the header only: format, size, and the pixel limit."""
    if not data:
        raise ImageError("empty file: no image data")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and at 2x, raises) on big images; our own limit below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(
            "not a supported image: expected JPEG, PNG, GIF, BMP or WebP data"
        ) from None
    except Image.DecompressionBombError:
        # Pillow refuses at open beyond 2 x its own MAX_IMAGE_PIXELS; say it in our terms.
        raise ImageError(
            f"image too large: the header claims over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels, "
            f"limit is {max_pixels}",
            status=413,
        ) from None
    except Exception as exc:  # Pillow raises many kinds on hostile headers
        raise ImageError(f"cannot read image header: {exc}") from None

    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"image too large: {width}x{height} = {width * height} pixels, "
            f"limit is {max_pixels}",
            status=413,
        )
    if img.format == "JPEG":
        try:
            # Let libjpeg decode at 1/2..1/8 scale while at least 2 x size pixels remain on
            # each side (policy 3); img.size becomes the reduced size.
            img.draft("RGB", (size * 2, size * 2))
        except Exception as exc:
            raise ImageError(f"corrupt or truncated JPEG image: {exc}") from None
    return img


def _to_model_input(img: Image.Image, data: bytes, size: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            if img.format == "PNG":
                _check_png_complete(data)
            ImageOps.exif_transpose(img, in_place=True)  # no full-size copy when upright
            rgb = _to_rgb(img)
    except ImageError:
        raise
    except Exception as exc:  # truncated or corrupt pixel data
        raise ImageError(f"corrupt or truncated {img.format} image: {exc}") from None

    return _fit(rgb, size)


def _fit(rgb: Image.Image, size: int) -> np.ndarray:
    if rgb.size != (size, size):
        rgb = ImageOps.fit(rgb, (size, size), method=Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def _plain_jpeg(data: bytes, max_pixels: int, size: int) -> tuple[int, int] | None:
    """(width, height) of a JPEG that simplejpeg may decode for Pillow: no EXIF (whose
    orientation Pillow applies), colour or grey, within the pixel limit, and small enough that
    Pillow would not decode it at a reduced scale (step 3 above: under 4S on its shorter side).
    None for anything else."""
    if not data.startswith(b"\xff\xd8") or _has_exif(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if (colorspace not in ("YCbCr", "Gray") or width * height > max_pixels
            or min(width, height) >= 4 * size or min(width, height) < 1):
        return None
    return width, height


def _decode_plain_jpeg(data: bytes) -> np.ndarray | None:
    """RGB pixels, or None where libjpeg-turbo finds the data damaged (Pillow's path then
    says how)."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:
        return None


def _has_exif(data: bytes) -> bool:
    """Whether an APP1 Exif segment comes before the JPEG's image data (or the markers cannot
    be followed, which counts as yes: Pillow's path decides then)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return True
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: no more headers
            return False
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return True
        pos += 2 + length
    return True
