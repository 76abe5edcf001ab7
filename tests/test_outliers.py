"""Synthetic outliers for outlier exposure (convnet.outliers)."""

import numpy as np
import pytest

from convnet import outliers


def photos(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth images with an object-like bright square: unlike noise, shuffling them shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        base = rng.uniform(40, 120, 3) + 80 * np.stack([yy, xx, yy * xx], -1)
        top, left = rng.integers(0, size // 2, 2)
        base[top : top + size // 3, left : left + size // 3] += 100
        images[i] = np.clip(base, 0, 255)
    return images


@pytest.mark.parametrize("size", [32, 96])
def test_every_kind_comes_in_turn_at_any_size(size):
    images = photos(10, size)
    made = outliers.synthetic(images, 2 * len(outliers.KINDS), np.random.default_rng(1))
    assert made.shape == (12, size, size, 3) and made.dtype == np.uint8
    sources = {im.tobytes() for im in images}
    assert not any(im.tobytes() in sources for im in made)  # none is a training image as is


def test_the_same_stream_gives_the_same_outliers():
    images = photos(8, 32)
    a = outliers.synthetic(images, 9, np.random.default_rng(5))
    b = outliers.synthetic(images, 9, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert outliers.synthetic(images, 0, np.random.default_rng(5)).shape == (0, 32, 32, 3)


def test_jigsaw_keeps_the_pixels_and_moves_the_tiles():
    images = photos(4, 32)
    out = outliers._jigsaw(images, np.random.default_rng(2))
    for before, after in zip(images, out, strict=True):
        assert sorted(before.reshape(-1, 3).tolist()) == sorted(after.reshape(-1, 3).tolist())
        assert not np.array_equal(before, after)
