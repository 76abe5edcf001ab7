"""Synthetic outliers for outlier exposure: images of none of the classes, made from the batch.

Outlier exposure (Hendrycks et al., 2019) trains the network to give images of none of its
classes a flat answer (target 1/K for every class), so that the unsure rule's energy score
separates them. Its published gains come from a large set of real outlier photos; none is at
hand here, so these are made from the training images themselves, kinds that keep their colours
and textures but lose the object: tiles shuffled, sideways or upside-down views, colour channels
permuted or inverted, zoomed-in corners, smooth random fields and pixel noise
(bench/unsure_posthoc.py measured which kinds point towards real photos of other things).

All numpy on uint8 (N, S, S, 3), from a random stream the caller owns.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

KINDS = ("jigsaw", "rotation", "colour", "zoom", "smooth field", "noise")


def _jigsaw(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image cut into 4 x 4 tiles (a quarter side each), shuffled."""
    n, size = len(images), images.shape[1]
    tile = size // 4
    x = images[:, : 4 * tile, : 4 * tile].reshape(n, 4, tile, 4, tile, 3)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(n, 16, tile, tile, 3)
    x = np.stack([im[rng.permutation(16)] for im in x]).reshape(n, 4, 4, tile, tile, 3)
    out = images.copy()
    out[:, : 4 * tile, : 4 * tile] = x.transpose(0, 1, 3, 2, 4, 5).reshape(n, 4 * tile,
                                                                           4 * tile, 3)
    return out


def _rotation(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.stack([np.rot90(im, int(rng.integers(1, 4))) for im in images])


def _colour(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Channels in another order, or the negative."""
    orders = ((1, 2, 0), (2, 0, 1), (2, 1, 0))
    return np.stack([im[..., orders[rng.integers(3)]] if rng.random() < 0.5 else 255 - im
                     for im in images])


def _zoom(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random square of a quarter to under a half of the side, blown up to the full size."""
    size = images.shape[1]
    out = np.empty_like(images)
    for i, im in enumerate(images):
        side = int(rng.integers(max(2, size // 4), max(3, size * 7 // 16) + 1))
        top, left = rng.integers(0, size - side + 1, 2)
        crop = Image.fromarray(im[top : top + side, left : left + side])
        out[i] = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
    return out


def _smooth_field(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random colours on a 2x2 to 8x8 grid, interpolated to the full size."""
    size = images.shape[1]
    grids = (rng.integers(0, 256, (g, g, 3), dtype=np.uint8) for g in rng.choice([2, 4, 8],
                                                                               len(images)))
    return np.stack([np.asarray(Image.fromarray(grid).resize((size, size),
                                                             Image.Resampling.BICUBIC))
                     for grid in grids])


def _noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, images.shape, dtype=np.uint8)


_MAKERS = {"jigsaw": _jigsaw, "rotation": _rotation, "colour": _colour, "zoom": _zoom,
           "smooth field": _smooth_field, "noise": _noise}


def synthetic(images: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` outliers, the kinds in turn, each made from a random image of `images`."""
    if count <= 0:
        return images[:0].copy()
    sources = images[rng.integers(0, len(images), count)]
    kinds = np.arange(count) % len(KINDS)
    out = np.empty_like(sources)
    for k, kind in enumerate(KINDS):
        rows = kinds == k
        if rows.any():
            out[rows] = _MAKERS[kind](sources[rows], rng)
    return out
