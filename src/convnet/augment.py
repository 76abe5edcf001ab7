"""Batch augmentation and test-time views, in numpy on uint8 (N, S, S, 3) arrays.

Numpy rather than framework ops, so training on TensorFlow or JAX and evaluation on ONNX Runtime
all see exactly the same pixels.

Two training policies (train.batches applies them):
- airbench (CIFAR-style thumbnails): random flips and translations of a few pixels, applied to a
  whole epoch at once (with progressive resizing the first epochs are then downscaled:
  `downscale`);
- photo: a batch at a time, optional random resized crops (`crop_boxes`, `crop_resize`: a box
  of a given share of the area, aspect ratio 3:4 to 4:3, resized back to S x S), translations,
  a random mirror (`photo_batch`), and CutMix on a share of the batches (`cutmix`). Nothing
  but the batch is copied, and nothing but Pillow's resampling touches floats.
Evaluation and serving see the deterministic view (imaging.decode_image: centre square).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image


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


# Images per Pillow call in `downscale`: strips of 512 thumbnails stay in the cache. 50,000
# images from 32 to 24 px on this machine: 0.55 s (0.8 s from the mirrored view of an odd
# epoch), against 0.7 s in strips of 16,384, 1.4 s one image at a time and 6 s for
# tf.image.resize(antialias=True)
DOWNSCALE_CHUNK = 512


def downscale(images: np.ndarray, size: int, chunk: int = DOWNSCALE_CHUNK) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, size, size, 3): Pillow's antialiased bilinear resize of each
    image, exactly (the same pixels as Image.resize one image at a time), two passes of one
    Pillow call per `chunk` images: the images' rows stacked into one tall picture for the
    horizontal pass, their columns side by side in one wide picture for the vertical pass (as
    Pillow itself resizes, horizontal then vertical through 8 bits), so no filter ever spans
    two images."""
    n, height, width, channels = images.shape
    out = np.empty((n, size, size, channels), np.uint8)
    for start in range(0, n, chunk):
        part = np.ascontiguousarray(images[start:start + chunk])
        m = len(part)
        tall = Image.fromarray(part.reshape(m * height, width, channels))
        narrow = np.asarray(tall.resize((size, m * height), Image.Resampling.BILINEAR))
        wide = np.ascontiguousarray(narrow.reshape(m, height, size, channels)
                                    .transpose(1, 0, 2, 3)).reshape(height, m * size, channels)
        short = np.asarray(Image.fromarray(wide).resize((m * size, size),
                                                        Image.Resampling.BILINEAR))
        out[start:start + m] = short.reshape(size, m, size, channels).transpose(1, 0, 2, 3)
    return out


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate by (dy, dx) pixels with reflected borders."""
    p = max(abs(dy), abs(dx))
    if p == 0:
        return images
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    return padded[:, p - dy : p - dy + h, p - dx : p - dx + w]


def tta_views(images: np.ndarray) -> Iterator[tuple[np.ndarray, float]]:
    """Views whose predicted probabilities are averaged with the given weights: the image and
    its mirror (half the weight), and both shifted one pixel each diagonal way (the other half).
    One at a time, so only one shifted copy of a large set is held at once."""
    for shifted, weight in ((0, 0.5), (1, 0.25), (-1, 0.25)):
        base = shift(images, shifted, shifted)
        yield base, weight / 2
        yield base[:, :, ::-1], weight / 2


def crop_boxes(n: int, size: int, rng: np.random.Generator, scale: tuple[float, float],
               ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> np.ndarray:
    """(n, 4) float boxes (top, left, height, width) in pixels of a size x size image: area a
    uniform fraction in `scale`, aspect ratio (width / height) log-uniform in `ratio`, placed
    uniformly; as torchvision's RandomResizedCrop, the first of `tries` draws that fits, else
    the whole image."""
    area = rng.uniform(*scale, (n, tries)) * size * size
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, tries)))
    width, height = np.sqrt(area * aspect), np.sqrt(area / aspect)
    fits = (width <= size) & (height <= size)
    first = fits.argmax(1)
    rows = np.arange(n)
    width = np.where(fits.any(1), width[rows, first], size)
    height = np.where(fits.any(1), height[rows, first], size)
    top = rng.uniform(0, 1, n) * (size - height)
    left = rng.uniform(0, 1, n) * (size - width)
    return np.stack([top, left, height, width], axis=1)


def crop_resize(images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Each image's box resampled to the full size x size, bilinear (Pillow's: pixel centres
    aligned, so a whole-image box returns the image unchanged). uint8 in and out; 7x faster
    than the same sampling as numpy gathers, and Pillow releases the GIL while it resamples."""
    size = images.shape[1]
    out = np.empty_like(images)
    for i, (image, (top, left, height, width)) in enumerate(zip(images, boxes, strict=True)):
        out[i] = np.asarray(Image.fromarray(image).resize(
            (size, size), Image.Resampling.BILINEAR, box=(left, top, left + width, top + height)))
    return out


def photo_batch(images: np.ndarray, rng: np.random.Generator,
                scale: tuple[float, float] = (0.25, 1.0), flip: bool = True,
                translate: int = 0) -> np.ndarray:
    """The photo policy for one batch: random resized crops (none when scale is (1, 1)), random
    translations of up to `translate` pixels, and a random half mirrored."""
    out = images
    if scale[0] < 1:
        out = crop_resize(images, crop_boxes(len(images), images.shape[1], rng, scale))
    out = random_translate(out, translate, rng)
    if flip:
        mirror = rng.random(len(out)) < 0.5
        out = out.copy() if out is images else out
        out[mirror] = out[mirror, :, ::-1]
    return out


def cutmix(images: np.ndarray, targets: np.ndarray, rng: np.random.Generator,
           alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """CutMix one batch: paste a random box of each image's partner (the batch shuffled) over
    it, box area drawn from Beta(alpha, alpha), and mix the targets (N, C) by the areas."""
    n, size = len(images), images.shape[1]
    partner = rng.permutation(n)
    keep = rng.beta(alpha, alpha)
    side = int(round(size * np.sqrt(1 - keep)))
    if side == 0:
        return images, targets
    top, left = rng.integers(0, size - side + 1, 2)
    out = images.copy()
    out[:, top:top + side, left:left + side] = images[partner, top:top + side, left:left + side]
    pasted = side * side / (size * size)
    return out, (1 - pasted) * targets + pasted * targets[partner]
