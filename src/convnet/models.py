"""Network builders. Pure: no file I/O, no data, nothing at import time beyond Keras itself.

Every model takes raw uint8 pixels (N, 32, 32, 3) and returns logits (N, num_classes);
normalisation lives inside the graph so no consumer can feed differently scaled input.

    build("fast", 10)      airbench-style network, the default
    build("quick", 10)     the same family, narrower: for a short CPU budget
    build("tutorial", 10)  the original tutorial's three-conv network, the baseline
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

# Per-channel statistics of the CIFAR-10 training images, in 0..255 pixel units.
CIFAR_MEAN = (125.3, 123.0, 113.9)
CIFAR_STD = (63.0, 62.1, 66.7)


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


def _normalise(pixels):
    """(x - mean) / std per channel, as constants in the graph (no variables to export)."""
    return layers.Rescaling(
        scale=[1 / s for s in CIFAR_STD],
        offset=[-m / s for m, s in zip(CIFAR_MEAN, CIFAR_STD, strict=True)],
        name="normalise",
    )(pixels)


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


def whitening_kernel(pixels, size: int, width: int, eps: float = 5e-4, xp=np):
    """The patch-whitening stem's kernel (size, size, C, width) from uint8 pixels (N, H, W, C):
    eigenvectors of the uncentred second moments of size x size patches, scaled to unit
    variance, largest first, then their negatives (airbench's stem). `xp` is numpy or
    jax.numpy, so the same function serves both training loops."""
    x = (xp.asarray(pixels, dtype="float32") - xp.asarray(CIFAR_MEAN, dtype="float32")) \
        / xp.asarray(CIFAR_STD, dtype="float32")
    h, w = x.shape[1] - size + 1, x.shape[2] - size + 1
    # (kh, kw, c) order, as a Keras kernel (kh, kw, c_in, c_out) flattens
    patches = xp.stack([x[:, i:i + h, j:j + w] for i in range(size) for j in range(size)], axis=3)
    patches = patches.reshape(-1, size * size * x.shape[-1])
    eigenvalues, eigenvectors = xp.linalg.eigh(patches.T @ patches / patches.shape[0])
    filters = (eigenvectors / xp.sqrt(eigenvalues + eps))[:, ::-1]
    kernel = filters.reshape(size, size, x.shape[-1], -1)
    return xp.concatenate([kernel, -kernel], axis=-1)[..., :width]


def build_airbench(spec: AirbenchSpec, num_classes: int, name: str = "fast") -> keras.Model:
    pixels = keras.Input((32, 32, 3), dtype="uint8", name="pixels")
    x = _normalise(pixels)
    # The stem's weights are set from the data by train.init_whitening and then frozen.
    x = layers.Conv2D(spec.whiten_width, 2, padding="valid", name="whiten", trainable=False)(x)
    x = _activation(spec.activation)(x)
    for i, width in enumerate(spec.widths):
        x = _conv_group(x, width, spec, name=f"group{i + 1}")
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    x = layers.Dense(num_classes, use_bias=False, name="head")(x)
    logits = layers.Rescaling(spec.logit_scale, name="logits")(x)
    return keras.Model(pixels, logits, name=name)


def build_tutorial(num_classes: int) -> keras.Model:
    """The tutorial's network, layer for layer: three VALID convs (5x5x4, 7x7x3, 5x5x2), each
    followed by ReLU and a 2x2 max-pool of stride 1, dropout, FC 200, FC num_classes; no biases,
    truncated-normal init with stddev 0.05."""
    init = keras.initializers.TruncatedNormal(stddev=0.05)
    pixels = keras.Input((32, 32, 3), dtype="uint8", name="pixels")
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


def build(preset: str, num_classes: int) -> keras.Model:
    """A fresh, untrained model returning logits for raw uint8 pixels."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if preset == "tutorial":
        return build_tutorial(num_classes)
    if preset in PRESETS:
        return build_airbench(PRESETS[preset], num_classes, name=preset)
    raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(NAMES)}")


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
