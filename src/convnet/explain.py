"""Which pixels drove an answer: occlusion maps, computed with the model itself in batches.

Model-agnostic: it needs only `predict`, uint8 (N, S, S, 3) -> probabilities (N, C), so it works
for every model directory ONNX Runtime can run. The image is cut into a GRID x GRID grid of cells;
a square of PATCH x PATCH cells is blanked (filled with the image's mean colour) at each of the
(GRID - PATCH + 1)^2 places it fits, all the blanked copies go through the model in one batch,
and each cell scores the mean drop in the explained class's probability over the squares that
cover it. A cell whose blanking lowers the probability scores > 0; one whose blanking raises it
(evidence against the class) scores < 0.

Why occlusion: it is deterministic, needs no gradients (ONNX Runtime gives none) and no
architecture-specific layer, and at GRID 8, PATCH 2 it costs 49 model runs per image. Its
faithfulness (a deletion test against random order) and cost are measured by
`python bench/explain.py` (bench/results/explain.md).

    probs = predict(images)                          # (N, C)
    maps = occlusion_maps(predict, images, probs.argmax(1))  # (N, GRID, GRID) probability drops
    png = overlay_png(images[0], maps[0])            # the input, tinted where maps[0] > 0
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

GRID = 8  # cells per side: the heatmap is GRID x GRID whatever the input size S
PATCH = 2  # cells per side of the blanked square: (GRID - PATCH + 1)^2 = 49 runs per image
MAX_BATCH = 256  # images per predict call; bounds memory for large inputs (S=160: 20 MB)
TINT = np.array([255, 32, 0], np.float32)  # the overlay's colour for "drove the answer"
TINT_ALPHA = 0.7  # opacity of the tint on the most salient cell

Predict = Callable[[np.ndarray], np.ndarray]  # uint8 (N, S, S, 3) -> (N, C) probabilities


def cell_edges(size: int, grid: int = GRID) -> np.ndarray:
    """(grid + 1,) pixel boundaries of the cells along one side: cell i is [e[i], e[i+1])."""
    if not 1 <= grid <= size:
        raise ValueError(f"grid {grid} must be from 1 to the image side {size}")
    return np.round(np.linspace(0, size, grid + 1)).astype(int)


def patch_masks(size: int, grid: int = GRID, patch: int = PATCH) -> np.ndarray:
    """(P, S, S) bool: True where each blanked square lies, P = (grid - patch + 1)^2, row-major
    by the square's top-left cell."""
    if not 1 <= patch <= grid:
        raise ValueError(f"patch {patch} must be from 1 to grid {grid}")
    edges = cell_edges(size, grid)
    places = grid - patch + 1
    masks = np.zeros((places, places, size, size), bool)
    for i in range(places):
        for j in range(places):
            masks[i, j, edges[i]:edges[i + patch], edges[j]:edges[j + patch]] = True
    return masks.reshape(-1, size, size)


def _cover(grid: int, patch: int) -> np.ndarray:
    """(P, grid * grid) float32: row p holds 1 for the cells square p covers."""
    places = grid - patch + 1
    cover = np.zeros((places, places, grid, grid), np.float32)
    for i in range(places):
        for j in range(places):
            cover[i, j, i:i + patch, j:j + patch] = 1
    return cover.reshape(places * places, grid * grid)


def occlusion_maps(predict: Predict, images: np.ndarray, targets: np.ndarray,
                   base: np.ndarray | None = None, *, grid: int = GRID, patch: int = PATCH,
                   fill: np.ndarray | None = None, max_batch: int = MAX_BATCH) -> np.ndarray:
    """(N, grid, grid) float32: per cell, the mean drop in probability of class targets[n] when
    a square covering the cell is blanked. images: uint8 (N, S, S, 3); targets: (N,) class
    indices; base: (N, C) probabilities of the unblanked images, if already computed; fill:
    (N, 3) uint8 colour of the blanked squares, default each image's mean colour."""
    images = np.asarray(images, np.uint8)
    n, size = len(images), images.shape[1]
    targets = np.asarray(targets, int)
    if base is None:
        base = predict(images)
    masks = patch_masks(size, grid, patch)  # (P, S, S)
    cover = _cover(grid, patch)  # (P, G*G)
    counts = cover.sum(0)  # squares covering each cell: 1 in the corners, `patch`^2 inside
    if fill is None:
        fill = mean_colours(images)
    drops = np.empty((n, len(masks)), np.float32)
    per_call = max(1, max_batch // len(masks))  # images whose blanked copies share one call
    for start in range(0, n, per_call):
        part = slice(start, start + per_call)
        copies = np.where(masks[None, :, :, :, None], fill[part, None, None, None, :],
                          images[part, None])  # (n', P, S, S, 3): every blanked copy
        probs = predict(copies.reshape(-1, size, size, 3)).reshape(len(copies), len(masks), -1)
        chosen = targets[part]
        drops[part] = (base[part][np.arange(len(chosen)), chosen][:, None]
                       - probs[np.arange(len(chosen)), :, chosen])
    return ((drops @ cover) / counts).reshape(n, grid, grid)


def mean_colours(images: np.ndarray) -> np.ndarray:
    """(N, 3) uint8: each image's mean colour, the fill of a blanked square."""
    return images.reshape(len(images), -1, 3).mean(1).round().astype(np.uint8)


def to_pixels(heatmap: np.ndarray, size: int) -> np.ndarray:
    """(G, G) cell scores -> (S, S), each pixel taking its cell's score."""
    edges = cell_edges(size, heatmap.shape[0])
    index = np.repeat(np.arange(heatmap.shape[0]), np.diff(edges))  # (S,) pixel -> cell
    return heatmap[np.ix_(index, index)]


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """uint8 (S, S, 3): `image` tinted red where the heatmap is positive, in proportion to the
    score over the map's largest one (no tint at all if nothing scores > 0)."""
    heat = np.clip(to_pixels(heatmap, image.shape[0]), 0, None)
    peak = heat.max()
    alpha = (TINT_ALPHA * heat / peak if peak > 0 else heat * 0)[..., None]
    return (image * (1 - alpha) + TINT * alpha).round().astype(np.uint8)


def overlay_png(image: np.ndarray, heatmap: np.ndarray) -> bytes:
    """`overlay` as PNG bytes, at the model's input size."""
    buffer = io.BytesIO()
    Image.fromarray(overlay(image, heatmap)).save(buffer, format="PNG")
    return buffer.getvalue()
