import contextlib
import io

import numpy as np
import pytest
from PIL import Image
from synthetic import encode

from convnet import imaging
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


@pytest.mark.parametrize("size", [32, 64, 224])
def test_an_image_the_model_size_passes_through_untouched(size):
    pixels = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode(pixels, "PNG"), size=size), pixels)


@pytest.mark.parametrize("size", [32, 64, 224])
@pytest.mark.parametrize("shape", [(300, 100), (100, 300), (20, 12)], ids=str)
def test_the_centre_square_is_resized_to_any_size(size, shape):
    """Wide or tall, smaller or larger than S: the centre square (blue) fills the S x S output,
    the red sides are cropped away (Lanczos blends a little of them in along the cut edges)."""
    side = min(shape)
    image = Image.new("RGB", shape, (255, 0, 0))
    left, top = (shape[0] - side) // 2, (shape[1] - side) // 2
    image.paste((0, 0, 255), (left, top, left + side, top + side))
    out = decode_image(encode_image(image, "PNG"), size=size)
    assert out.shape == (size, size, 3)
    assert out[size // 2, size // 2].tolist() == [0, 0, 255]
    red, _, blue = out.reshape(-1, 3).mean(axis=0)
    assert red < 16 and blue > 240  # the whole 300x100 resized instead: red 170


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


@pytest.fixture(scope="module")
def large_photo() -> dict[str, bytes]:
    """A 4800x3600 (17 Mpx) image per format, far larger than any model input."""
    return {fmt: encode_image(Image.new("L", (4800, 3600)), fmt) for fmt in ("PNG", "JPEG")}


@pytest.mark.parametrize("fmt,size,charged", [
    ("PNG", 32, 4800 * 3600), ("PNG", 224, 4800 * 3600),
    ("JPEG", 32, 600 * 450), ("JPEG", 224, 600 * 450),  # 1/8 scale: 450 >= 2 x 224
    ("JPEG", 512, 2400 * 1800),  # 1/2 scale: 1/4 would leave 900 < 2 x 512 pixels
])
def test_reserve_is_asked_for_the_pixels_actually_decoded(large_photo, fmt, size, charged):
    """What is decoded, and so the memory a decode holds, does not grow with S while the JPEG
    still has 16 S pixels on its shorter side: 1/64 of the header's pixels."""
    recorder = Recorder()
    out = decode_image(large_photo[fmt], size=size, reserve=recorder.reserve)
    assert out.shape == (size, size, 3)
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


def _jpeg(pixels: np.ndarray, **save_args) -> bytes:
    mode = "L" if pixels.ndim == 2 else "RGB"
    return encode_image_args(Image.fromarray(pixels, mode), "JPEG", **save_args)


def encode_image_args(image: Image.Image, fmt: str, **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def _through_pillow(data: bytes, size: int) -> np.ndarray:
    return imaging._to_model_input(imaging._open(data, imaging.MAX_PIXELS, size), data, size)


PLAIN_JPEGS = {  # (height, width, grey?, save arguments), all without EXIF
    "cifar": ((32, 32), False, {"quality": 75}),
    "4:4:4": ((32, 32), False, {"quality": 95, "subsampling": 0}),
    "4:2:2": ((32, 32), False, {"subsampling": 1}),
    "progressive": ((32, 32), False, {"progressive": True}),
    "grey": ((32, 32), True, {}),
    "odd size, resized": ((37, 51), False, {}),
    "larger, under 4S": ((100, 120), False, {"quality": 90}),
    "tiny": ((5, 7), False, {}),
}


@pytest.mark.parametrize("name", PLAIN_JPEGS)
def test_plain_jpegs_decode_as_pillow_decodes_them(name):
    """The libjpeg-turbo shortcut gives Pillow's pixels exactly, whatever the JPEG's options."""
    shape, grey, save_args = PLAIN_JPEGS[name]
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, shape if grey else (*shape, 3), dtype=np.uint8)
    pixels = np.clip(pixels.astype(int) // 2 + 64, 0, 255).astype(np.uint8)
    data = _jpeg(pixels, **save_args)
    assert imaging._plain_jpeg(data, imaging.MAX_PIXELS, 32) is not None  # the shortcut runs
    np.testing.assert_array_equal(decode_image(data), _through_pillow(data, 32))


def test_jpegs_the_shortcut_leaves_to_pillow():
    exif = Image.Exif()
    exif[0x0112] = 3  # upside down
    with_exif = encode_image_args(Image.new("RGB", (32, 32)), "JPEG", exif=exif)
    cmyk = encode_image_args(Image.new("CMYK", (32, 32), (0, 255, 0, 0)), "JPEG")
    large = encode_image_args(Image.new("RGB", (128, 300)), "JPEG")  # Pillow drafts at 1/2
    for data in (with_exif, cmyk, large, b"\xff\xd8\xff"):
        assert imaging._plain_jpeg(data, imaging.MAX_PIXELS, 32) is None
    assert imaging._plain_jpeg(large, 10_000, 64) is None  # over the pixel limit
    np.testing.assert_array_equal(decode_image(cmyk), _through_pillow(cmyk, 32))


def test_a_truncated_plain_jpeg_gets_pillows_error():
    data = _jpeg(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    cut = data[: len(data) * 3 // 4]  # headers whole, scan data cut short
    assert imaging._plain_jpeg(cut, imaging.MAX_PIXELS, 32) is not None
    recorder = Recorder()
    with pytest.raises(ImageError, match="corrupt or truncated JPEG") as err:
        decode_image(cut, reserve=recorder.reserve)
    assert err.value.status == 400 and recorder.held == 0
