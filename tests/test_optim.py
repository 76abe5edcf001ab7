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


# --- AirbenchMuon --------------------------------------------------------------------------------

def polar(matrix: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(matrix, full_matrices=False)
    return u @ vt


@pytest.mark.parametrize("shape", [(36, 8), (8, 36), (16, 16)])
def test_newton_schulz_lands_near_the_polar_factor_whatever_the_scale(shape):
    from convnet.optim import orthogonalise

    g = np.random.default_rng(2).normal(size=shape).astype("float32")
    o = keras.ops.convert_to_numpy(orthogonalise(keras.ops.convert_to_tensor(g)))
    assert o.shape == shape
    singular = np.linalg.svd(o, compute_uv=False)
    assert singular.min() > 0.6 and singular.max() < 1.25  # near 1, as Muon needs
    target = polar(g)
    assert np.linalg.norm(o - target) / np.linalg.norm(target) < 0.3
    big = keras.ops.convert_to_numpy(orthogonalise(keras.ops.convert_to_tensor(1e4 * g)))
    np.testing.assert_allclose(big, o, atol=1e-4)


def conv_model() -> keras.Model:
    pixels = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, use_bias=False, name="group1_conv0")(pixels)
    x = keras.layers.BatchNormalization(scale=False, name="group1_bn0")(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    return keras.Model(pixels, keras.layers.Dense(2, use_bias=False, name="head")(x))


def apply(optimizer, model, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    variables = model.trainable_variables
    optimizer.apply_gradients([(keras.ops.convert_to_tensor(grads[v.path]), v)
                               for v in variables])
    return {v.path: v.numpy().copy() for v in variables}


def test_muon_steps_conv_kernels_along_the_orthogonalised_nesterov_momentum():
    from convnet.optim import AirbenchMuon, orthogonalise

    keras.utils.set_random_seed(0)
    model = conv_model()
    rng = np.random.default_rng(3)
    kernel = model.get_layer("group1_conv0").kernel
    start = kernel.numpy().copy()
    grads = [{v.path: rng.normal(size=v.shape).astype("float32")
              for v in model.trainable_variables} for _ in range(2)]
    lr, mu = 0.1, 0.6
    opt = AirbenchMuon(muon_lr=lr, muon_momentum=mu, learning_rate=0.5)

    def expected(k, direction):
        k = k * np.sqrt(3) / np.linalg.norm(k)  # the norm of sqrt(output channels)
        step = keras.ops.convert_to_numpy(orthogonalise(
            keras.ops.convert_to_tensor(direction.reshape(-1, 3))))
        return k - 0.5 * lr * step.reshape(k.shape)

    g0, g1 = grads[0][kernel.path], grads[1][kernel.path]
    after = apply(opt, model, grads[0])[kernel.path]
    np.testing.assert_allclose(after, expected(start, g0 + mu * g0), atol=1e-5)
    m1 = mu * g0 + g1
    again = apply(opt, model, grads[1])[kernel.path]
    np.testing.assert_allclose(again, expected(after, g1 + mu * m1), atol=1e-5)


def test_a_muon_step_has_the_same_length_whatever_the_gradient_s_scale():
    from convnet.optim import AirbenchMuon

    moved = []
    for scale in (1.0, 1e3):
        keras.utils.set_random_seed(0)
        model = conv_model()
        rng = np.random.default_rng(4)
        grads = {v.path: scale * rng.normal(size=v.shape).astype("float32")
                 for v in model.trainable_variables}
        moved.append(apply(AirbenchMuon(), model, grads)["group1_conv0/kernel"])
    np.testing.assert_allclose(moved[0], moved[1], atol=1e-5)


def test_muon_s_other_variables_take_nesterov_sgd_with_their_own_rates_and_coupled_decay():
    from convnet.optim import AirbenchMuon

    keras.utils.set_random_seed(0)
    model = conv_model()
    rng = np.random.default_rng(5)
    start = {v.path: v.numpy().copy() for v in model.trainable_variables}
    grads = {v.path: rng.normal(size=v.shape).astype("float32")
             for v in model.trainable_variables}
    factor, mu, decay = 0.5, 0.85, 0.01
    opt = AirbenchMuon(bias_lr=0.2, head_lr=0.03, momentum=mu, decay=decay,
                       learning_rate=factor)
    after = apply(opt, model, grads)
    for path, lr in (("group1_bn0/beta", 0.2), ("head/kernel", 0.03)):
        g = grads[path] + decay / lr * start[path]
        np.testing.assert_allclose(after[path], start[path] - factor * lr * (g + mu * g),
                                   rtol=1e-5, atol=1e-7)


def test_muon_s_head_rate_is_converted_so_any_logit_scale_learns_the_same_logits():
    """airbench94_muon's head rate is for unit-variance weights divided by the width; a model
    whose head carries another logit scale must move its logits by the same amount."""
    from convnet.train.recipe import muon_optimizer

    rng = np.random.default_rng(6)
    features = rng.normal(size=(32, 16)).astype("float32")
    targets = np.eye(3, dtype="float32")[np.arange(32) % 3]
    unit = rng.normal(size=(16, 3)).astype("float32")
    moved = []
    for scale in (1 / 9, 1 / 16):
        inputs = keras.Input((16,))
        x = keras.layers.Dense(3, use_bias=False, name="head")(inputs)
        model = keras.Model(inputs, keras.layers.Rescaling(scale, name="logits")(x))
        model.get_layer("head").kernel.assign(unit / (16 * scale))  # the same logits
        before = model.predict(features, verbose=0)
        model.compile(optimizer=muon_optimizer(model, batch_size=32, steps=10),
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        model.fit(features, targets, batch_size=32, epochs=1, shuffle=False, verbose=0)
        moved.append(model.predict(features, verbose=0) - before)
    assert np.abs(moved[0]).max() > 0.01  # a real step
    np.testing.assert_allclose(moved[0], moved[1], rtol=1e-3, atol=1e-5)
