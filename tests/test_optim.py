"""AirbenchSGD through `model.fit`, where the TensorFlow backend hands update_step its own
variables (named "layer/name:0", no Keras path): the rules must hold there, not only on JAX."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from convnet.optim import AirbenchSGD, TriangularSchedule
from convnet.train import WhitenBiasEpochs


def stem_model() -> keras.Model:
    pixels = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(2, 2, name="whiten", activation="gelu")(pixels)
    x = keras.layers.BatchNormalization(scale=False, name="bn")(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    return keras.Model(pixels, keras.layers.Dense(2, use_bias=False, name="head")(x))


def one_step(*, bias_lr_scale=1.0) -> dict[str, np.ndarray]:
    """Weight changes after one fit step from a fixed start on fixed data."""
    keras.utils.set_random_seed(0)
    model = stem_model()
    model.get_layer("bn").beta.assign(np.full(2, 0.1, "float32"))
    model.compile(optimizer=AirbenchSGD(learning_rate=0.01, momentum=0.5, nesterov=True,
                                        bias_lr_scale=bias_lr_scale), loss="mse")
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return {v.path: v.numpy() - before[v.path] for v in model.trainable_variables}


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, 6, 6, 1)), rng.normal(size=(8, 2))


def test_the_stem_kernel_never_moves_and_its_bias_learns_for_some_epochs():
    keras.utils.set_random_seed(0)
    model = stem_model()
    model.compile(optimizer=AirbenchSGD(learning_rate=0.01, momentum=0.5, nesterov=True),
                  loss="mse")
    stem, seen = model.get_layer("whiten"), []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append([w.copy() for w in stem.get_weights()]))
    x, y = data()
    initial = [w.copy() for w in stem.get_weights()]
    model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
              callbacks=[WhitenBiasEpochs(2), record])
    kernels, biases = [initial[0]] + [k for k, _ in seen], [initial[1]] + [b for _, b in seen]
    assert all(np.array_equal(k, initial[0]) for k in kernels)
    assert np.abs(biases[1] - biases[0]).max() > 1e-6  # learns in epochs 1 and 2
    assert np.abs(biases[2] - biases[1]).max() > 1e-6
    np.testing.assert_array_equal(biases[4], biases[2])  # frozen from epoch 3
    assert not stem.trainable


def test_batchnorm_biases_learn_faster_by_the_scale():
    slow, fast = one_step(bias_lr_scale=1.0), one_step(bias_lr_scale=64.0)
    np.testing.assert_allclose(fast["bn/beta"], 64 * slow["bn/beta"], rtol=1e-4)
    np.testing.assert_allclose(fast["head/kernel"], slow["head/kernel"], rtol=1e-6)


def test_nesterov_with_a_moving_learning_rate_matches_the_pytorch_form():
    """Momentum holds gradients; the step's learning rate applies at the update; coupled L2."""
    steps, mu, l2 = 4, 0.85, 0.01
    schedule = TriangularSchedule(0.05, steps, warmup=0.5, start=0.2, end=0.1)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(16, 3)).astype("float32"), rng.normal(size=(16, 2)).astype("float32")
    w0 = rng.normal(size=(3, 2)).astype("float32")

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, use_bias=False, name="head")(inputs))
    model.get_layer("head").kernel.assign(w0)
    model.compile(optimizer=AirbenchSGD(learning_rate=schedule, momentum=mu, nesterov=True,
                                        l2=l2), loss="mse")
    model.fit(x, y, batch_size=16, epochs=steps, shuffle=False, verbose=0)

    w, m = w0.astype("float64"), np.zeros_like(w0, "float64")
    for step in range(steps):
        g = 2 * x.T @ (x @ w - y) / y.size + l2 * w
        m = mu * m + g
        w = w - float(schedule(step)) * (g + mu * m)
    assert float(schedule(1)) != pytest.approx(float(schedule(0)))  # the lr does move
    np.testing.assert_allclose(model.get_layer("head").kernel.numpy(), w, rtol=1e-4, atol=1e-6)
