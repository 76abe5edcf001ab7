import io

import numpy as np
import pytest
from PIL import Image
from synthetic import encode

from convnet.imaging import ImageError, decode_image


def _image(size, mode="RGB", color=(10, 200, 30)):
    return Image.new(mode, size, color if mode == "RGB" else None)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_allowed_formats_decode_to_uint8_32(fmt):
    buf = io.BytesIO()
    _image((50, 40)).save(buf, format=fmt)
    out = decode_image(buf.getvalue())
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
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")
    with pytest.raises(ImageError, match="too large") as err:
        decode_image(buf.getvalue(), max_pixels=1_000_000)
    assert err.value.status == 413
