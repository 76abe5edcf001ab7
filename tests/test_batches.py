"""The fit loop's batches (convnet.train.batches): what reaches the model, epoch by epoch."""

import numpy as np
import pytest

pytest.importorskip("keras")
from convnet import augment  # noqa: E402
from convnet.data import Split  # noqa: E402
from convnet.train import Batches, TrainConfig  # noqa: E402


def noise_split(n: int, seed: int = 0) -> Split:
    """Random pixels: every shift and mirror of every image is a distinct array."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return Split(images, rng.integers(0, 3, n), ["a", "b", "c"])


def views(images: np.ndarray, max_shift: int) -> dict[bytes, tuple[int, bool]]:
    """Every translation of each image by up to max_shift pixels (reflected borders, as the
    augmentation pads), plain and mirrored: bytes -> (shift in pixels, mirrored)."""
    found = {}
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            shifted = augment.shift(images, dy, dx)
            for mirrored, batch in ((False, shifted), (True, shifted[:, :, ::-1])):
                for image in batch:
                    found.setdefault(image.tobytes(), (max(abs(dy), abs(dx)), mirrored))
    return found


def seen(split: Split, cfg: TrainConfig, epochs: int, max_shift: int) -> list[tuple[int, bool]]:
    """(shift, mirrored) of every image the batches hand over in `epochs` epochs."""
    batches = Batches(split, cfg, 3)
    known = views(split.images, max_shift)
    out = []
    for i in range(epochs * batches.steps_per_epoch):
        for image in batches[i][0]:
            assert image.tobytes() in known, "an image that is no allowed view of any input"
            out.append(known[image.tobytes()])
    return out


def test_no_flip_means_no_mirrored_image_reaches_the_model():
    split = noise_split(40)
    # two epochs: the odd one is where airbench mirrors every image
    flipped = seen(split, TrainConfig(batch_size=8, flip=False, translate=2), 2, 2)
    assert not any(mirrored for _, mirrored in flipped)
    # and the check can see a mirror: with flips on, both kinds arrive
    default = seen(split, TrainConfig(batch_size=8, flip=True, translate=2), 2, 2)
    assert {m for _, m in default} == {True, False}


@pytest.mark.parametrize("translate", [0, 1, 3])
def test_translate_bounds_the_shift(translate):
    split = noise_split(40, seed=translate)
    shifts = [s for s, _ in seen(split, TrainConfig(batch_size=8, flip=False,
                                                    translate=translate), 2, translate + 1)]
    assert max(shifts) == translate  # never further, and the whole range is used


def test_batches_run_on_across_epochs_and_resume_where_they_stopped():
    split = noise_split(100)
    cfg = TrainConfig(batch_size=32, seed=5)
    batches = Batches(split, cfg, 3)
    assert batches.steps_per_epoch == 3 and batches.num_batches is None  # endless
    run = [batches[i] for i in range(9)]  # three epochs in one sequence
    resumed = Batches(split, cfg, 3, epoch=2)
    for i in range(3):
        np.testing.assert_array_equal(resumed[i][0], run[6 + i][0])
        np.testing.assert_array_equal(resumed[i][1], run[6 + i][1])
    # every epoch draws a new order and new shifts; labels stay one-hot rows of the images' own
    assert not np.array_equal(run[0][0], run[3][0])
    assert run[0][1].shape == (32, 3) and (run[0][1].sum(axis=1) == 1).all()


def test_the_tensorflow_pipeline_serves_the_same_batches_without_autotuning():
    pytest.importorskip("tensorflow")
    split = noise_split(100, seed=1)
    cfg = TrainConfig(batch_size=32, seed=7)
    dataset = Batches(split, cfg, 3).tf_dataset()
    # the autotuner's thread is what stalled the end of fit: it must not run
    assert dataset.options().autotune.enabled is False
    expected = Batches(split, cfg, 3)
    for i, (x, y) in enumerate(dataset.take(7)):  # across two epoch boundaries
        np.testing.assert_array_equal(x.numpy(), expected[i][0])
        np.testing.assert_array_equal(y.numpy(), expected[i][1])


# --- the photo policy: augmented a batch at a time --------------------------------------------

PHOTO = dict(augment="photo", batch_size=16, seed=3, crop_scale=0.25)


def test_photo_batches_copy_nothing_but_the_batch():
    split = noise_split(64)
    batches = Batches(split, TrainConfig(**PHOTO), 3)
    x, y = batches[0]
    assert x.shape == (16, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (16, 3)
    assert batches.base is split.images and batches.images is None  # no epoch-wide copy


def test_photo_batches_are_the_same_on_resume_and_new_each_epoch():
    split = noise_split(64)
    run = Batches(split, TrainConfig(**PHOTO), 3)
    first = [run[i][0] for i in range(8)]  # two epochs of four
    resumed = Batches(split, TrainConfig(**PHOTO), 3, epoch=1)
    for i in range(4):
        np.testing.assert_array_equal(resumed[i][0], first[4 + i])
    assert not np.array_equal(first[0], first[4])


def test_photo_batches_are_crops_not_the_images():
    split = noise_split(64)
    x, _ = Batches(split, TrainConfig(**PHOTO), 3)[0]
    originals = {image.tobytes() for image in split.images}
    originals |= {image[:, ::-1].tobytes() for image in split.images}
    assert sum(image.tobytes() in originals for image in x) < len(x) // 2


def test_class_weights_come_with_each_image():
    split = noise_split(48)
    weights = np.array([0.5, 1.0, 2.0], np.float32)
    x, y, w = Batches(split, TrainConfig(batch_size=16), 3, weights=weights)[1]
    np.testing.assert_array_equal(w, weights[y.argmax(1)])


def test_the_smallest_crop_grows_to_crop_scale_end_by_the_last_epoch():
    cfg = TrainConfig(**{**PHOTO, "crop_scale": 0.2}, epochs=5, crop_scale_end=1.0)
    batches = Batches(noise_split(32), cfg, 3)
    assert [batches.crop_scale(e) for e in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert Batches(noise_split(32), TrainConfig(**PHOTO), 3).crop_scale(4) == 0.25  # constant
    assert Batches(noise_split(32), TrainConfig(augment="photo", batch_size=16),
                   3).crop_scale(0) == 1.0  # by default no resized crops at all


def test_photo_batches_with_full_crops_are_shifts_and_mirrors_of_the_images():
    split = noise_split(40)
    cfg = TrainConfig(augment="photo", batch_size=8, crop_scale=1.0, translate=2, cutmix=0)
    batches = Batches(split, cfg, 3)
    known = views(split.images, 2)
    shifts = []
    for i in range(2 * batches.steps_per_epoch):
        for image in batches[i][0]:
            assert image.tobytes() in known
            shifts.append(known[image.tobytes()])
    assert max(s for s, _ in shifts) == 2 and {m for _, m in shifts} == {True, False}


def test_cutmix_mixes_images_and_targets_by_area():
    from convnet import augment

    images = np.stack([np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)])
    targets = np.eye(2, dtype=np.float32)
    rng = np.random.default_rng(0)
    for _ in range(20):
        mixed, mixed_targets = augment.cutmix(images, targets, rng)
        pasted = (mixed[0] == 255).all(-1).mean()  # image 0's share taken from image 1
        partner_is_other = mixed_targets[0, 1] > 0 or pasted == 0
        if partner_is_other:
            np.testing.assert_allclose(mixed_targets[0], [1 - pasted, pasted], atol=1e-6)
        np.testing.assert_allclose(mixed_targets.sum(1), 1, atol=1e-6)


def test_outlier_exposure_appends_flat_targets_to_every_batch():
    split = noise_split(48)
    weights = np.array([0.5, 1.0, 2.0], np.float32)
    batches = Batches(split, TrainConfig(batch_size=16, outliers=0.25), 3, weights=weights)
    x, y, w = batches[1]
    assert x.shape == (20, 32, 32, 3) and y.shape == (20, 3) and w.shape == (20,)
    np.testing.assert_array_equal(y[16:], np.full((4, 3), 1 / 3, np.float32))
    np.testing.assert_array_equal(w[16:], 1.0)
    np.testing.assert_array_equal(y[:16].sum(1), 1.0)  # the real images keep their one-hot
    plain = Batches(split, TrainConfig(batch_size=16), 3, weights=weights)[1]
    np.testing.assert_array_equal(x[:16], plain[0])  # and are the same images as without
    assert not {im.tobytes() for im in x[16:]} & {im.tobytes() for im in split.images}
    np.testing.assert_array_equal(batches[1][0], x)  # the same again: resumable


def test_outliers_split_evenly_over_processes():
    split = noise_split(48)
    whole = Batches(split, TrainConfig(batch_size=16, outliers=0.25), 3)[0]
    parts = [Batches(split, TrainConfig(batch_size=16, outliers=0.25), 3, shard=(i, 2))[0]
             for i in range(2)]
    assert [len(p[0]) for p in parts] == [10, 10]
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole[1])


# --- progressive resizing: the first epochs downscaled ------------------------------------------

def test_progressive_epochs_are_the_plain_epochs_downscaled_then_the_plain_ones():
    split = noise_split(64)
    cfg = TrainConfig(batch_size=16, seed=4, progressive=(24, 2))
    batches, plain = Batches(split, cfg, 3), Batches(split, TrainConfig(batch_size=16, seed=4), 3)
    assert [batches.image_size(e) for e in range(4)] == [24, 24, 32, 32]
    for i in range(4 * batches.steps_per_epoch):  # four epochs of four batches
        (x, y), (px, py) = batches[i], plain[i]
        np.testing.assert_array_equal(y, py)  # the same order
        if i < 2 * batches.steps_per_epoch:  # the same augmentation, then downscaled
            assert x.shape == (16, 24, 24, 3)
            np.testing.assert_array_equal(x, augment.downscale(px, 24))
        else:  # and the full-size epochs are the plain run's, seeds and all
            assert x.shape == (16, 32, 32, 3)
            np.testing.assert_array_equal(x, px)


def test_progressive_batches_resume_at_their_epoch_s_size():
    split = noise_split(64)
    cfg = TrainConfig(batch_size=16, seed=4, progressive=(20, 2))
    run = Batches(split, cfg, 3)
    whole = [run[i][0] for i in range(12)]
    for epoch in (1, 2):
        resumed = Batches(split, cfg, 3, epoch=epoch)
        for i in range(4):
            np.testing.assert_array_equal(resumed[i][0], whole[4 * epoch + i])
    assert Batches(split, cfg, 3, epoch=1)[0][0].shape[1] == 20
    assert Batches(split, cfg, 3, epoch=2)[0][0].shape[1] == 32


def test_the_tensorflow_pipeline_takes_both_sizes_only_when_progressive():
    pytest.importorskip("tensorflow")
    split = noise_split(32)
    plain = Batches(split, TrainConfig(batch_size=16), 3).tf_dataset()
    assert plain.element_spec[0].shape == (16, 32, 32, 3)  # as before: one fixed shape
    dataset = Batches(split, TrainConfig(batch_size=16, progressive=(24, 1)), 3).tf_dataset()
    assert dataset.element_spec[0].shape.as_list() == [16, None, None, 3]
    sizes = [x.shape[1] for x, _ in dataset.take(4)]  # two epochs of two batches
    assert sizes == [24, 24, 32, 32]


def test_progressive_resizing_needs_whole_epochs():
    with pytest.raises(ValueError, match="photo"):
        Batches(noise_split(32), TrainConfig(batch_size=16, augment="photo",
                                             progressive=(24, 1)), 3)
