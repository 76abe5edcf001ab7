"""Batch augmentation and test-time views, in numpy on uint8 (N, 32, 32, 3) arrays.

Numpy rather than framework ops, so training on TensorFlow or JAX and evaluation on ONNX Runtime
all see exactly the same pixels.
"""

from __future__ import annotations

import numpy as np


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror a random half of the images left-right."""
    flip = rng.random(len(images)) < 0.5
    out = images.copy()
    out[flip] = images[flip, :, ::-1]
    return out


def random_translate(images: np.ndarray, pixels: int, rng: np.random.Generator) -> np.ndarray:
    """Shift each image by up to `pixels` in x and y, filling the border by reflection
    (a random crop of the reflect-padded image)."""
    if pixels <= 0:
        return images
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pixels, pixels), (pixels, pixels), (0, 0)), mode="reflect")
    dy = rng.integers(0, 2 * pixels + 1, n)
    dx = rng.integers(0, 2 * pixels + 1, n)
    out = np.empty_like(images)
    # One slice per distinct shift: at most (2p+1)^2 vectorised copies instead of n small ones.
    for y in range(2 * pixels + 1):
        for x in range(2 * pixels + 1):
            idx = np.flatnonzero((dy == y) & (dx == x))
            if len(idx):
                out[idx] = padded[idx, y : y + h, x : x + w]
    return out


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate by (dy, dx) pixels with reflected borders."""
    p = max(abs(dy), abs(dx))
    if p == 0:
        return images
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    return padded[:, p - dy : p - dy + h, p - dx : p - dx + w]


def tta_views(images: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Views whose predicted probabilities are averaged with the given weights: the image and
    its mirror (half the weight), and both shifted one pixel each diagonal way (the other half)."""
    views = []
    for base, weight in ((images, 0.5), (shift(images, 1, 1), 0.25), (shift(images, -1, -1), 0.25)):
        views.append((base, weight / 2))
        views.append((base[:, :, ::-1], weight / 2))
    return views
