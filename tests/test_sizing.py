"""Defaults that adapt to the data (convnet.sizing): CIFAR-10 keeps the presets' own, small photo
sets get a larger input, a smaller batch and more epochs."""

import pytest

from convnet import sizing
from convnet.data import Survey


def survey(short_side: int, num_images: int = 3000) -> Survey:
    return Survey("image-folder", 5, num_images, short_side)


@pytest.mark.parametrize(("short_side", "size"), [
    (32, 32), (36, 32),  # CIFAR-style thumbnails, and a few pixels more
    (48, 48), (60, 56),  # small photos: their own size, a multiple of 8
    (64, 64), (90, 88), (96, 96), (177, 96), (3000, 96),  # photos: PHOTO_SIZE
])
def test_default_image_size(short_side, size):
    assert sizing.default_image_size(survey(short_side)) == size


def test_cifar_batches_are_thumbnails():
    cifar = Survey("cifar-batches", 10, 50_000, 32)
    assert sizing.default_image_size(cifar) == 32
    assert sizing.default_augment(cifar) == "airbench"
    assert sizing.default_augment(survey(177)) == "photo"


@pytest.mark.parametrize(("num_train", "preset_batch", "batch"), [
    (50_000, 1024, 1024), (50_000, 512, 512), (45_000, 1024, 1024),  # CIFAR-10: unchanged
    (2_349, 1024, 64),  # flowers: 36 steps an epoch
    (10_000, 1024, 256), (180, 512, 64), (40, 1024, 32), (1, 1024, 1),
])
def test_batch_size_for(num_train, preset_batch, batch):
    assert sizing.batch_size_for(num_train, preset_batch) == batch


@pytest.mark.parametrize(("num_train", "preset_epochs"), [(50_000, 8), (50_000, 6), (45_000, 8),
                                                           (50_000, 12)])
def test_cifar_keeps_the_presets_epochs(num_train, preset_epochs):
    assert sizing.epochs_for(num_train, preset_epochs) == preset_epochs


def test_a_small_set_trains_longer_but_not_forever():
    assert sizing.epochs_for(2_349, 8) * 2_349 >= sizing.MIN_IMAGES_SEEN
    assert sizing.epochs_for(10, 8) == sizing.MAX_EPOCHS
