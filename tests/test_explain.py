"""Occlusion maps (convnet.explain) on a model whose answer is known to rest on one corner."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from convnet import explain

GREY, RED = (110, 110, 110), (250, 20, 20)
CORNERS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}


def mean_colour_model(pixels: np.ndarray) -> np.ndarray:
    """The tiny test model in numpy: softmax(6 x mean R, G, B) over three classes, so red
    anywhere in the image pushes the answer towards class 0."""
    logits = 6 * pixels.astype(np.float32).mean(axis=(1, 2)) / 255
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def cue_image(size: int, corner: tuple[int, int], cue: int) -> np.ndarray:
    """Grey, with a red square `cue` pixels wide in one corner: the only reason to say class 0."""
    image = np.full((size, size, 3), GREY, np.uint8)
    rows = slice(0, cue) if corner[0] == 0 else slice(size - cue, size)
    cols = slice(0, cue) if corner[1] == 0 else slice(size - cue, size)
    image[rows, cols] = RED
    return image


def quadrant_share(heatmap: np.ndarray, corner: tuple[int, int]) -> float:
    """Share of the map's positive mass in the quadrant at `corner`."""
    half = heatmap.shape[0] // 2
    positive = np.clip(heatmap, 0, None)
    rows = slice(0, half) if corner[0] == 0 else slice(half, None)
    cols = slice(0, half) if corner[1] == 0 else slice(half, None)
    return float(positive[rows, cols].sum() / positive.sum())


@pytest.mark.parametrize("size", [32, 36])  # 36: cells of unequal width
@pytest.mark.parametrize("corner", CORNERS.values(), ids=CORNERS.keys())
def test_the_heatmap_finds_the_corner_that_carries_the_answer(corner, size):
    image = cue_image(size, corner, cue=size // 4)
    probs = mean_colour_model(image[None])
    assert probs.argmax() == 0  # red: the answer rests on the corner
    heatmap = explain.occlusion_maps(mean_colour_model, image[None], probs.argmax(1))[0]
    assert heatmap.shape == (explain.GRID, explain.GRID)
    assert quadrant_share(heatmap, corner) > 0.9
    cell = np.unravel_index(heatmap.argmax(), heatmap.shape)
    assert cell == tuple(0 if c == 0 else explain.GRID - 1 for c in corner)


def test_batches_of_any_size_give_the_same_maps():
    images = np.stack([cue_image(32, corner, 8) for corner in CORNERS.values()])
    targets = np.zeros(4, int)
    whole = explain.occlusion_maps(mean_colour_model, images, targets)
    calls = []

    def counted(pixels):
        calls.append(len(pixels))
        return mean_colour_model(pixels)

    split = explain.occlusion_maps(counted, images, targets, mean_colour_model(images),
                                   max_batch=60)  # one image's 49 copies per call
    np.testing.assert_allclose(split, whole, atol=1e-6)
    assert calls == [49] * 4


def test_masks_cover_every_cell_and_cells_tile_the_image():
    assert list(explain.cell_edges(36, 8)) == [0, 4, 9, 14, 18, 22, 27, 32, 36]
    masks = explain.patch_masks(32)
    assert masks.shape == (49, 32, 32)
    assert masks[0, :8, :8].all() and masks[0].sum() == 64
    assert masks.any(0).all()
    with pytest.raises(ValueError):
        explain.patch_masks(32, grid=4, patch=5)


def test_overlay_tints_only_what_drove_the_answer():
    image = np.full((32, 32, 3), 100, np.uint8)
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[0, 0], heatmap[7, 7] = 0.4, -0.3
    tinted = explain.overlay(image, heatmap)
    assert (tinted[:4, :4] != image[:4, :4]).all()  # the salient cell
    assert tinted[:4, :4, 0].min() > 100  # towards red
    np.testing.assert_array_equal(tinted[4:, 4:], image[4:, 4:])  # negative or zero: untouched
    np.testing.assert_array_equal(explain.overlay(image, np.zeros((8, 8))), image)  # no tint
    decoded = np.asarray(Image.open(io.BytesIO(explain.overlay_png(image, heatmap))))
    np.testing.assert_array_equal(decoded, tinted)
