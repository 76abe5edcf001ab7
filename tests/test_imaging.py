import contextlib
import io

import numpy as np
import pytest
from PIL import Image
from synthetic import encode

from convnet.imaging import ImageError, decode_image


def _image(size, mode="RGB", color=(10, 200, 30)):
    return Image.new(mode, size, color if mode == "RGB" else None)


def encode_image(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_allowed_formats_decode_to_uint8_32(fmt):
    out = decode_image(encode_image(_image((50, 40)), fmt))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_32x32_passes_through_untouched():
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode(pixels, "PNG")), pixels)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 32, 32))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise on display: the white half ends up on top
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    out = decode_image(buf.getvalue()).astype(int)
    assert out[:8].mean() > 200 and out[-8:].mean() < 50


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty"),
        (b"<html><script>alert(1)</script></html>", "not a supported image"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "not a supported image"),
        (encode(np.zeros((32, 32, 3), np.uint8), "PNG")[:60], "corrupt or truncated"),
    ],
)
def test_bad_images(payload, message):
    with pytest.raises(ImageError, match=message) as err:
        decode_image(payload)
    assert err.value.status == 400


def test_pixel_limit_checked_from_header():
    with pytest.raises(ImageError, match="too large") as err:
        decode_image(encode_image(Image.new("L", (3000, 3000)), "PNG"), max_pixels=1_000_000)
    assert err.value.status == 413


def test_transparency_is_composited_onto_white():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = np.arange(32)[:, None] * 8  # red ramp down the rows
    rgba[..., 3] = np.arange(32)[None, :] * 8  # alpha ramp across the columns
    image = Image.fromarray(rgba, "RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    expected = np.asarray(Image.alpha_composite(white, image).convert("RGB"))
    np.testing.assert_array_equal(decode_image(encode_image(image, "PNG")), expected)


class Recorder:
    """A `reserve` for decode_image that records what it was asked for and whether it was let go."""

    def __init__(self):
        self.asked: list[int] = []
        self.held = 0

    @contextlib.contextmanager
    def reserve(self, pixels: int):
        self.asked.append(pixels)
        self.held += pixels
        try:
            yield
        finally:
            self.held -= pixels


@pytest.mark.parametrize("fmt,charged", [("PNG", 4000 * 3000), ("JPEG", 500 * 375)])
def test_reserve_is_asked_for_the_pixels_actually_decoded(fmt, charged):
    """JPEG decodes at 1/8 scale here, so it costs 1/64 of its header's pixels."""
    recorder = Recorder()
    data = encode_image(Image.new("L", (4000, 3000)), fmt)
    assert decode_image(data, reserve=recorder.reserve).shape == (32, 32, 3)
    assert recorder.asked == [charged] and recorder.held == 0


def test_reserve_is_let_go_when_decoding_fails():
    recorder = Recorder()
    data = encode_image(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) - 20], reserve=recorder.reserve)
    assert recorder.asked == [64 * 64] and recorder.held == 0


def test_what_reserve_raises_propagates_before_any_pixel_is_decoded():
    class Full(Exception):
        pass

    def refuse(pixels):
        raise Full(pixels)

    with pytest.raises(Full):
        decode_image(encode_image(Image.new("RGB", (64, 64)), "PNG"), reserve=refuse)
    with pytest.raises(ImageError, match="too large"):  # the header check comes first
        decode_image(encode_image(Image.new("L", (200, 200)), "PNG"), max_pixels=100,
                     reserve=refuse)
