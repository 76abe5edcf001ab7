"""Network builders. Pure: no file I/O, no data, nothing at import time beyond Keras itself.

Every model takes raw uint8 pixels (N, S, S, 3) and returns logits (N, num_classes);
normalisation lives inside the graph so no consumer can feed differently scaled input. The
per-channel mean and standard deviation it subtracts and divides by are the training data's
(`pixel_stats`), written into the graph as constants; they also set the whitening stem.

    build("fast", 10)                   airbench-style network, the default
    build("quick", 10)                  the same family, narrower: for a short CPU budget
    build("tutorial", 10)               the original tutorial's three-conv network, the baseline
    build("fast", 5, image_size=64, stats=pixel_stats(images))
    build("fast", 10, any_size=True)   takes images of any size; the stem still suits 32 px

The airbench networks scale with S by their stem: at S >= 64 the whitening stem takes
non-overlapping p x p patches (p = S // 32), so the conv groups see a map of about 32 x 32 whatever
S is, and a 64 px model costs about what a 32 px one does. A p x p patch stem keeps every one of its
3p^2 whitened directions (and their negatives), so nothing is lost before the first conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

MIN_IMAGE_SIZE = 16  # the airbench nets pool three times after the stem
TUTORIAL_MIN_SIZE = 24  # its three VALID convs take 16 pixels off each side
WHITEN_CHUNK = 1 << 26  # patch values per chunk when whitening: 256 MB of float32


@dataclass(frozen=True)
class PixelStats:
    """Per-channel mean and standard deviation of training pixels, 0..255 units (R, G, B)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# The CIFAR-10 training images': what models built before the statistics came from each
# model's own data used (the bundled model), and build()'s default.
CIFAR_STATS = PixelStats(mean=(125.3, 123.0, 113.9), std=(63.0, 62.1, 66.7))


def pixel_stats(images: np.ndarray, chunk_pixels: int = 1 << 22) -> PixelStats:
    """Per-channel statistics of uint8 images (N, H, W, 3), exact, from a histogram of each
    channel's values built a chunk of about `chunk_pixels` pixels at a time: no float copy of
    the set. Rounded to 0.01 so the graph's constants read well."""
    counts = np.zeros((3, 256), np.int64)
    chunk = max(1, chunk_pixels // max(1, images.shape[1] * images.shape[2]))
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].reshape(-1, 3)
        for c in range(3):
            counts[c] += np.bincount(part[:, c], minlength=256)
    values = np.arange(256, dtype=np.float64)
    total = np.maximum(counts.sum(1), 1)
    mean = counts @ values / total
    std = np.sqrt(np.maximum(counts @ values**2 / total - mean**2, 1.0))  # flat images divide

    def rounded(figures) -> tuple[float, float, float]:
        r, g, b = (round(float(v), 2) for v in figures)
        return r, g, b

    return PixelStats(rounded(mean), rounded(std))


@dataclass(frozen=True)
class AirbenchSpec:
    widths: tuple[int, int, int] = (64, 256, 256)  # output channels of the three conv groups
    whiten_width: int = 24  # 2x2 patch-whitening stem: 12 eigen-filters and their negatives
    bn_momentum: float = 0.4  # Keras convention: moving = m * moving + (1 - m) * batch
    logit_scale: float = 1 / 9  # airbench scales logits down; keeps the initial loss near log(C)
    activation: str = "gelu"


PRESETS = {
    "fast": AirbenchSpec(),
    "quick": AirbenchSpec(widths=(32, 64, 128)),
}
NAMES = ("fast", "quick", "tutorial")


@keras.saving.register_keras_serializable(package="convnet")
def gelu_tanh(x):
    """GELU, tanh form: the erf form has no ONNX op at the opsets tf2onnx emits."""
    return keras.activations.gelu(x, approximate=True)


def _activation(name: str):
    return layers.Activation(gelu_tanh if name == "gelu" else name)


def _normalise(pixels, stats: PixelStats):
    """(x - mean) / std per channel, as constants in the graph (no variables to export)."""
    return layers.Rescaling(
        scale=[1 / s for s in stats.std],
        offset=[-m / s for m, s in zip(stats.mean, stats.std, strict=True)],
        name="normalise",
    )(pixels)


def stem_patch(image_size: int) -> tuple[int, int]:
    """(side, stride) of the whitening stem's patches: 2 x 2 overlapping (stride 1) below
    64 px; from 64 px on, S // 32 non-overlapping, so the first conv sees a map of about
    32 x 32."""
    if image_size < 64:
        return 2, 1
    return image_size // 32, image_size // 32


def _conv_group(x, width: int, spec: AirbenchSpec, name: str):
    """conv -> pool -> BN -> act -> conv -> BN -> act, as airbench's ConvGroup."""
    for i in range(2):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        if i == 0:
            x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
        x = layers.BatchNormalization(
            momentum=spec.bn_momentum, epsilon=1e-12, scale=False, name=f"{name}_bn{i}"
        )(x)
        x = _activation(spec.activation)(x)
    return x


def whitening_sample(images: np.ndarray, seed: int, size: int = 5000) -> np.ndarray:
    """A random `size` of the images (all of them when fewer), whose patches set the whitening
    stem: not the first ones, since loaders may return the images grouped by class."""
    if len(images) <= size:
        return images
    chosen = np.random.default_rng([seed, 2]).choice(len(images), size, replace=False)
    return images[np.sort(chosen)]


def whitening_kernel(pixels, size: int, width: int, stats: PixelStats = CIFAR_STATS,
                     eps: float = 5e-4, xp=np):
    """The patch-whitening stem's kernel (size, size, C, width) from uint8 pixels (N, H, W, C):
    eigenvectors of the uncentred second moments of size x size patches (of the images
    normalised by `stats`), scaled to unit variance, largest first, then their negatives
    (airbench's stem). Summed over chunks of images, so large images need no float copy of the
    whole sample. `xp` is numpy or jax.numpy, so the same function serves both training loops."""
    mean = xp.asarray(stats.mean, dtype="float32")
    std = xp.asarray(stats.std, dtype="float32")
    n, height, width_px, channels = pixels.shape
    h, w = height - size + 1, width_px - size + 1
    dims = size * size * channels
    step = max(1, WHITEN_CHUNK // (h * w * dims))
    moments, count = 0, 0
    for start in range(0, n, step):
        x = (xp.asarray(pixels[start:start + step], dtype="float32") - mean) / std
        # (kh, kw, c) order, as a Keras kernel (kh, kw, c_in, c_out) flattens
        patches = xp.stack([x[:, i:i + h, j:j + w] for i in range(size) for j in range(size)],
                           axis=3).reshape(-1, dims)
        moments = moments + patches.T @ patches
        count += patches.shape[0]
    eigenvalues, eigenvectors = xp.linalg.eigh(moments / count)
    filters = (eigenvectors / xp.sqrt(eigenvalues + eps))[:, ::-1]
    kernel = filters.reshape(size, size, channels, -1)
    return xp.concatenate([kernel, -kernel], axis=-1)[..., :width]


def build_airbench(spec: AirbenchSpec, num_classes: int, name: str = "fast", *,
                   image_size: int = 32, stats: PixelStats = CIFAR_STATS,
                   any_size: bool = False) -> keras.Model:
    """The airbench network for image_size x image_size pixels; with `any_size` its input
    takes any height and width (the layers allow it: convs, max-pools, a global pool), while
    the stem is still chosen for image_size."""
    side = None if any_size else image_size
    pixels = keras.Input((side, side, 3), dtype="uint8", name="pixels")
    x = _normalise(pixels, stats)
    # The stem's weights are set from the data by train.init_whitening and then frozen.
    patch, stride = stem_patch(image_size)
    width = spec.whiten_width * patch * patch // 4  # all 3p^2 directions and their negatives
    x = layers.Conv2D(width, patch, strides=stride, padding="valid", name="whiten",
                      trainable=False)(x)
    x = _activation(spec.activation)(x)
    for i, width in enumerate(spec.widths):
        x = _conv_group(x, width, spec, name=f"group{i + 1}")
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    x = layers.Dense(num_classes, use_bias=False, name="head")(x)
    logits = layers.Rescaling(spec.logit_scale, name="logits")(x)
    return keras.Model(pixels, logits, name=name)


def build_tutorial(num_classes: int, image_size: int = 32) -> keras.Model:
    """The tutorial's network, layer for layer: three VALID convs (5x5x4, 7x7x3, 5x5x2), each
    followed by ReLU and a 2x2 max-pool of stride 1, dropout, FC 200, FC num_classes; no biases,
    truncated-normal init with stddev 0.05. Inputs are scaled to 0..1, as the tutorial did."""
    if image_size < TUTORIAL_MIN_SIZE:
        raise ValueError(f"the tutorial net needs images of at least {TUTORIAL_MIN_SIZE} "
                         f"pixels, got {image_size}")
    init = keras.initializers.TruncatedNormal(stddev=0.05)
    pixels = keras.Input((image_size, image_size, 3), dtype="uint8", name="pixels")
    x = layers.Rescaling(1 / 255, name="to_unit")(pixels)
    for i, (size, filters) in enumerate([(5, 4), (7, 3), (5, 2)]):
        x = layers.Conv2D(
            filters, size, padding="valid", use_bias=False, kernel_initializer=init,
            activation="relu", name=f"conv{i + 1}",
        )(x)
        x = layers.MaxPooling2D(2, strides=1, padding="valid", name=f"pool{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    x = layers.Dense(200, use_bias=False, kernel_initializer=init, activation="relu",
                     name="fc1")(x)
    logits = layers.Dense(num_classes, use_bias=False, kernel_initializer=init, name="fc2")(x)
    return keras.Model(pixels, logits, name="tutorial")


def build(preset: str, num_classes: int, *, image_size: int = 32,
          stats: PixelStats = CIFAR_STATS, any_size: bool = False) -> keras.Model:
    """A fresh, untrained model returning logits for raw uint8 pixels (N, image_size,
    image_size, 3), normalised by `stats` inside the graph (the tutorial net scales by 1/255).
    `any_size` (airbench presets): the input takes (N, H, W, 3) of any H and W, and the
    architecture is still image_size's; for training at several sizes (progressive resizing)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if preset == "tutorial":
        if any_size:
            raise ValueError("the tutorial net takes one input size (its dense layer is sized "
                             "by it)")
        return build_tutorial(num_classes, image_size)
    if preset in PRESETS:
        return build_airbench(PRESETS[preset], num_classes, name=preset, image_size=image_size,
                              stats=stats, any_size=any_size)
    raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(NAMES)}")


def input_size(model: keras.Model) -> int:
    """S of a model taking (N, S, S, 3) pixels. A model built with any_size has none:
    ValueError (whoever built it knows the size it was built for)."""
    side = model.input.shape[1]
    if side is None:
        raise ValueError(f"the {model.name} model takes images of any size; give the size "
                         "it was built for")
    return int(side)


def normalisation(model: keras.Model) -> PixelStats:
    """The statistics an airbench model normalises by, read back from its graph (CIFAR_STATS
    for the tutorial net, which has none)."""
    try:
        layer = model.get_layer("normalise")
    except ValueError:
        return CIFAR_STATS
    scale = np.asarray(layer.scale, np.float64)
    offset = np.asarray(layer.offset, np.float64)
    std = np.round(1 / scale, 2)
    mean = np.round(-offset * std, 2)
    return PixelStats((float(mean[0]), float(mean[1]), float(mean[2])),
                      (float(std[0]), float(std[1]), float(std[2])))


def with_softmax(model: keras.Model) -> keras.Model:
    """Wrap a logits model so it returns probabilities: the form exported for serving."""
    probs = layers.Softmax(name="probabilities")(model.output)
    return keras.Model(model.input, probs, name=model.name)


def count_flops(model: keras.Model) -> int:
    """Forward multiply-accumulates x 2 per image, counted over Conv2D and Dense layers."""
    flops = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            flops += 2 * h * w * c_out * kh * kw * c_in
        elif isinstance(layer, layers.Dense):
            flops += 2 * layer.input.shape[-1] * layer.units
    return int(flops)
