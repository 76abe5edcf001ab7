"""Defaults that adapt to the data: the input size from the images' sizes, and the schedule
(batch size, epochs) from how many there are. Imports neither Keras nor TensorFlow, so the
command line can choose the size, and decode at it, before it loads them.

On CIFAR-10 (50,000 images of 32x32) every rule here returns the presets' own values: 32 px,
batch 1024 (quick 512 on model.fit) and 8 / 6 epochs. A small photo set gets a larger input, a
smaller batch (enough steps per epoch) and more epochs (enough steps in all); the figures behind
the constants are in bench/results/flowers_probes.md.
"""

from __future__ import annotations

import math

from convnet.data import CIFAR_SIZE, Survey

# TrainConfig.progressive asked to be off (`--progressive off`): here, not in train.config, so the
# command line can parse the option without loading Keras
PROGRESSIVE_OFF = (0, 0)
PHOTO_SIZE = 96  # default input side for photographs, pixels (flowers: 89% at 96 px, 87% at 64)
MIN_SIZE = 32  # photos smaller than PHOTO_SIZE are used at their own size, but not below this
SIZE_STEP = 8  # input sides are multiples of this
MIN_STEPS_PER_EPOCH = 32  # halve the batch until an epoch has this many steps...
MIN_BATCH = 64  # ...but not below this
MIN_IMAGES_SEEN = 96_000  # a run sees at least this many images (epochs x training images)
MAX_EPOCHS = 400  # however few the images


def default_image_size(survey: Survey) -> int:
    """32 for CIFAR-style thumbnails; for photographs PHOTO_SIZE, or the images' own median
    shorter side (a multiple of SIZE_STEP, at least MIN_SIZE) when that is smaller."""
    if not survey.photos:
        return CIFAR_SIZE
    own = max(MIN_SIZE, survey.short_side // SIZE_STEP * SIZE_STEP)
    return min(PHOTO_SIZE, own)


def default_augment(survey: Survey) -> str:
    """airbench's whole-epoch flips and translations for thumbnails; for photos the same a
    batch at a time, with CutMix (train.config.with_augmentation)."""
    return "photo" if survey.photos else "airbench"


def batch_size_for(num_train: int, preset_batch: int,
                   min_steps: int = MIN_STEPS_PER_EPOCH) -> int:
    """The preset's batch, halved while an epoch would have fewer than `min_steps` steps, down
    to MIN_BATCH; below that only while the batch exceeds the images."""
    batch = preset_batch
    while batch > 1 and (num_train < batch or (num_train // batch < min_steps
                                                and batch // 2 >= MIN_BATCH)):
        batch //= 2
    return batch


def epochs_for(num_train: int, preset_epochs: float) -> float:
    """The preset's epochs, or as many as it takes to see MIN_IMAGES_SEEN images (at most
    MAX_EPOCHS)."""
    needed = math.ceil(MIN_IMAGES_SEEN / max(num_train, 1))
    return max(preset_epochs, min(needed, MAX_EPOCHS))
