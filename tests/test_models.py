import numpy as np
import pytest

keras = pytest.importorskip("keras")
from convnet import models  # noqa: E402


@pytest.mark.parametrize("preset", ["fast", "quick", "tutorial"])
def test_build_takes_uint8_and_returns_logits(preset):
    model = models.build(preset, 7)
    assert model.input.dtype == "uint8"
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert tuple(model(x, training=False).shape) == (2, 7)


# The README's table states these figures; a change to a network must change them there too.
@pytest.mark.parametrize("preset, params, flops", [
    ("fast", 1_973_944, 236_294_720),  # airbench94's widths (64, 256, 256): about 2M parameters
    ("quick", 295_544, 39_774_784),
    # the tutorial's, by hand: kernels 5*5*3*4 + 7*7*4*3 + 5*5*3*2, dense 450*200 + 200*10;
    # multiply-adds 28*28*4*75 + 21*21*3*196 + 16*16*2*75 + 92,000, twice
    ("tutorial", 300 + 588 + 150 + 90_000 + 2_000,
     2 * (28 * 28 * 4 * 75 + 21 * 21 * 3 * 196 + 16 * 16 * 2 * 75 + 92_000)),
])
def test_parameter_and_flop_counts(preset, params, flops):
    model = models.build(preset, 10)
    assert model.count_params() == params
    assert models.count_flops(model) == flops


def test_tutorial_layers_match_the_tutorial():
    model = models.build("tutorial", 10)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [(c.kernel_size, c.filters) for c in convs] == [((5, 5), 4), ((7, 7), 3), ((5, 5), 2)]
    assert all(not c.use_bias and c.padding == "valid" for c in convs)
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert all(p.strides == (1, 1) and p.pool_size == (2, 2) for p in pools)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [200, 10] and not any(d.use_bias for d in dense)
    assert any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    # 32 -conv5-> 28 -pool-> 27 -conv7-> 21 -pool-> 20 -conv5-> 16 -pool-> 15; 15*15*2 = 450
    assert model.get_layer("flatten").output.shape[-1] == 450


def test_with_softmax_gives_probabilities():
    model = models.with_softmax(models.build("quick", 3))
    x = np.zeros((4, 32, 32, 3), np.uint8)
    probs = np.asarray(model(x, training=False))
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)


@pytest.mark.parametrize("preset, classes", [("nope", 10), ("fast", 1)])
def test_bad_arguments(preset, classes):
    with pytest.raises(ValueError):
        models.build(preset, classes)


@pytest.mark.parametrize(("size", "patch", "stride", "width"),
                         [(32, 2, 1, 24), (48, 2, 1, 24), (64, 2, 2, 24), (96, 3, 3, 54),
                          (128, 4, 4, 96)])
def test_the_stem_scales_with_the_input(size, patch, stride, width):
    model = models.build("quick", 5, image_size=size)
    assert tuple(model.input.shape) == (None, size, size, 3) and model.input.dtype == "uint8"
    stem = model.get_layer("whiten")
    assert stem.kernel_size == (patch, patch) and stem.strides == (stride, stride)
    assert stem.filters == width  # every direction of a patch, and its negative
    # from 64 px on, the groups see 32 x 32 whatever the input
    assert stem.output.shape[1] == (size - 1 if stride == 1 else 32)
    x = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    assert tuple(model(x, training=False).shape) == (2, 5)


def test_a_64_px_model_costs_about_what_a_32_px_one_does():
    small, large = (models.count_flops(models.build("fast", 5, image_size=s)) for s in (32, 64))
    assert large < 1.3 * small


def test_too_small_an_input_is_refused():
    with pytest.raises(ValueError, match="at least 16"):
        models.build("fast", 5, image_size=8)
    with pytest.raises(ValueError, match="at least 24"):
        models.build("tutorial", 5, image_size=16)


def test_pixel_stats_are_the_data_s_and_live_in_the_graph():
    rng = np.random.default_rng(0)
    images = np.clip(rng.normal((200, 100, 50), (10, 20, 30), (300, 16, 16, 3)), 0, 255)
    images = images.astype(np.uint8)
    stats = models.pixel_stats(images, chunk_pixels=7 * 16 * 16)  # chunks: the set's figures
    flat = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(stats.mean, flat.mean(0), atol=0.01)
    np.testing.assert_allclose(stats.std, flat.std(0), atol=0.01)
    model = models.build("quick", 3, image_size=32, stats=stats)
    assert models.normalisation(model) == stats
    normalise = keras.Model(model.input, model.get_layer("normalise").output)
    x = np.full((1, 32, 32, 3), stats.mean, np.float32).round().astype(np.uint8)
    np.testing.assert_allclose(np.asarray(normalise(x)), 0, atol=0.05)


def test_whitening_in_chunks_equals_whitening_at_once(monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, (50, 20, 20, 3), dtype=np.uint8)
    whole = models.whitening_kernel(images, 3, 54)
    monkeypatch.setattr(models, "WHITEN_CHUNK", 20 * 20 * 27 * 3)  # three images a chunk
    np.testing.assert_allclose(models.whitening_kernel(images, 3, 54), whole, rtol=1e-3,
                               atol=1e-4)


def test_an_any_size_model_takes_every_size_and_keeps_the_full_size_s_architecture():
    fixed, flexible = (models.build("quick", 5, image_size=64, any_size=a) for a in (False, True))
    assert tuple(flexible.input.shape) == (None, None, None, 3)
    assert [tuple(w.shape) for w in flexible.weights] == [tuple(w.shape) for w in fixed.weights]
    assert flexible.get_layer("whiten").kernel_size == (2, 2)  # 64 px's stem, not 32 px's
    for size in (48, 64):
        x = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        assert tuple(flexible(x, training=False).shape) == (2, 5)
    with pytest.raises(ValueError, match="any size"):
        models.input_size(flexible)
    with pytest.raises(ValueError, match="tutorial"):
        models.build("tutorial", 5, any_size=True)
