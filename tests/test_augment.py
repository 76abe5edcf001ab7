"""The photo augmentation (convnet.augment): random resized crops and flips, a batch at a time."""

import numpy as np
import pytest

from convnet import augment


def noise(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("scale", [(0.25, 1.0), (0.08, 1.0), (1.0, 1.0)])
def test_crop_boxes_stay_inside_and_cover_the_asked_area(scale):
    boxes = augment.crop_boxes(2000, 64, np.random.default_rng(0), scale)
    top, left, height, width = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 64 + 1e-9).all() and (left + width <= 64 + 1e-9).all()
    area = height * width / 64**2
    assert area.min() >= scale[0] - 1e-9 and area.max() <= scale[1] + 1e-9
    ratio = width / height
    assert ratio.min() >= 3 / 4 - 1e-9 and ratio.max() <= 4 / 3 + 1e-9


def test_a_whole_image_box_returns_the_image():
    images = noise(5, 48)
    boxes = np.tile([0.0, 0.0, 48.0, 48.0], (5, 1))
    np.testing.assert_array_equal(augment.crop_resize(images, boxes), images)


def test_a_crop_is_that_part_of_the_image_enlarged():
    image = np.zeros((1, 64, 64, 3), np.uint8)
    image[0, :32, :32] = 255  # the top-left quarter white
    out = augment.crop_resize(image, np.array([[0.0, 0.0, 32.0, 32.0]]))
    assert out[0, 2:-2, 2:-2].min() == 255  # that quarter fills the output


def test_photo_batch_is_uint8_of_the_same_shape_and_mirrors_about_half():
    images = np.repeat(noise(1, 32), 400, axis=0)
    rng = np.random.default_rng(3)
    out = augment.photo_batch(images, rng, scale=(1.0, 1.0))  # whole images: only flips act
    assert out.dtype == np.uint8 and out.shape == images.shape
    mirrored = (out == images[:, :, ::-1]).all(axis=(1, 2, 3))
    assert ((out == images).all(axis=(1, 2, 3)) | mirrored).all()
    assert 150 < mirrored.sum() < 250
    np.testing.assert_array_equal(
        augment.photo_batch(images, np.random.default_rng(3), (1.0, 1.0), flip=False), images)


@pytest.mark.parametrize(("size", "chunk"), [(24, 512), (16, 3), (20, 1000)])
def test_downscale_is_pillow_s_antialiased_resize_of_each_image(size, chunk):
    from PIL import Image

    images = noise(7, 32)[:, :, ::-1]  # a mirrored view, as the odd epochs hand it over
    expected = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize(
        (size, size), Image.Resampling.BILINEAR)) for im in images])
    out = augment.downscale(images, size, chunk=chunk)  # chunk 3: a short last strip
    assert out.shape == (7, size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
