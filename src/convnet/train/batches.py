"""The fit loop's input pipeline: shuffled, augmented batches of uint8 images and one-hot labels
(and per-image loss weights when the classes are weighted)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import keras
import numpy as np

from convnet import augment, outliers
from convnet.data import Split
from convnet.train.config import TrainConfig, with_augmentation


class Batches(keras.utils.PyDataset):
    """Shuffled, augmented (uint8 images, one-hot labels[, weights]) batches.

    cfg.augment "airbench" augments as airbench does: a random half of the images mirrored
    once, then every epoch a fresh random translation and, on odd epochs, every image mirrored;
    the epoch's images are augmented in one vectorised pass the first time a batch of it is
    asked for (two uint8 copies of the set: right for 32 px thumbnails). cfg.progressive
    (side, k) then downscales the augmented images of epochs 0 to k - 1 to side x side
    (augment.downscale: under a second for 50,000 from 32 to 24 px). "photo" augments each
    batch as it is asked for (augment.photo_batch: random resized crop and mirror), so nothing
    but the batch is ever copied, whatever the size of the set.

    Each epoch's order and augmentation come from the seed and the epoch (and the batch), so a
    resumed run sees the same data as an uninterrupted one. `weights` (per class) adds each
    image's loss weight to its batch. cfg.outliers F appends round(F x batch) synthetic outliers
    (convnet.outliers, made from the batch's images) with the flat target 1/K to every batch:
    outlier exposure. `shard` (i, n): keep the i-th of n equal slices of every
    batch, for process i of n in multi-host training (train.multihost).

    Endless: batch i belongs to epoch first_epoch + i // steps_per_epoch, and fit() is given
    `steps_per_epoch`, so one iterator serves the whole run: with a finite sequence Keras makes
    a new one every epoch, and on TensorFlow each switch could stall for 30 to 40 s with the
    CPU idle (quick preset, 2 cores; the cause is in `tf_dataset`)."""

    def __init__(self, split: Split, cfg: TrainConfig, num_classes: int, epoch: int = 0,
                 weights: np.ndarray | None = None, shard: tuple[int, int] = (0, 1)):
        super().__init__()
        if not cfg.batch_size:
            raise ValueError("Batches needs cfg.batch_size (train() sets the preset's default)")
        self.batch_size: int = cfg.batch_size
        cfg = with_augmentation(replace(cfg, image_size=split.images.shape[1]))
        self.translate: int = cfg.translate or 0
        self.split, self.cfg, self.num_classes = split, cfg, num_classes
        self.weights = weights
        self.shard = shard
        self.steps_per_epoch = len(split) // self.batch_size  # drop the ragged last batch
        # A multiple of the shard count, so every process gets its equal slice of them too.
        self.outlier_count = int(round(cfg.outliers * self.batch_size)) // shard[1] * shard[1]
        self.rows = self.batch_size + self.outlier_count
        self.per_batch = cfg.augment == "photo"
        if cfg.progressive and self.per_batch:
            raise ValueError("progressive resizing downscales airbench's whole epochs; "
                             "--augment photo has none")
        self.base = split.images
        if cfg.flip and not self.per_batch:
            rng = np.random.default_rng([cfg.seed, 1])  # apart from the per-epoch streams
            self.base = augment.random_flip(split.images, rng)
        self.start_at(epoch)

    def start_at(self, epoch: int) -> None:
        """Batch 0 is the first batch of `epoch` (a resumed run continues where it stopped)."""
        self.first_epoch = epoch
        self._shuffle(epoch)

    def _shuffle(self, epoch: int) -> None:
        self.epoch = epoch
        self.rng = np.random.default_rng(self.cfg.seed * 1000 + epoch)
        self.order = self.rng.permutation(len(self.split))
        self.images: np.ndarray | None = None

    def image_size(self, epoch: int) -> int:
        """The side of the images that epoch `epoch` (from 0) trains on."""
        if self.cfg.progressive and epoch < self.cfg.progressive[1]:
            return self.cfg.progressive[0]
        return self.split.images.shape[1]

    def _epoch_images(self) -> np.ndarray:
        if self.per_batch:
            return self.split.images
        if self.images is None:
            images = augment.random_translate(self.base, self.translate, self.rng)
            images = images[:, :, ::-1] if self.cfg.flip and self.epoch % 2 else images
            size = self.image_size(self.epoch)
            if size != images.shape[1]:  # no random draws: the later epochs' are unchanged
                images = augment.downscale(images, size)
            self.images = images
            return images
        return self.images

    @property
    def num_batches(self):
        return None  # endless

    def tf_dataset(self):
        """The same endless batches as a tf.data pipeline with autotuning off, for fit() on
        TensorFlow. The pipeline Keras builds from a PyDataset autotunes its prefetch, and the
        autotuner's thread sleeps for up to a minute between passes; destroying the iterator
        at the end of fit waits for it: 20 to 30 s with the CPU idle in 2 of 4 quick runs
        (gdb: RootDataset::Iterator's destructor waiting on Model::OptimizeLoop)."""
        import tensorflow as tf

        size = self.rows
        # Keras traces the train step on the iterator's element spec: with progressive
        # resizing one trace, of any height and width, serves both sizes (no retrace at the
        # switch); without, the images' fixed shape, as before.
        pixels = (None, None, 3) if self.cfg.progressive else self.split.images.shape[1:]
        signature = [tf.TensorSpec((size, *pixels), tf.uint8),
                     tf.TensorSpec((size, self.num_classes), tf.float32)]
        if self.weights is not None:
            signature.append(tf.TensorSpec((size,), tf.float32))
        dataset = tf.data.Dataset.from_generator(
            lambda: (self[i] for i in itertools.count()), output_signature=tuple(signature))
        options = tf.data.Options()
        options.autotune.enabled = False
        return dataset.prefetch(4).with_options(options)

    def __getitem__(self, i):
        epoch, i = divmod(i, self.steps_per_epoch)
        if self.first_epoch + epoch != self.epoch:
            self._shuffle(self.first_epoch + epoch)
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        labels = self.split.labels[idx]
        x = self._epoch_images()[idx]
        y = np.eye(self.num_classes, dtype="float32")[labels]
        if self.per_batch:
            x, y = self._photo_batch(x, y, i)
        weights = None if self.weights is None else self.weights[labels]
        if self.outlier_count:
            x, y, weights = self._with_outliers(x, y, weights, i)
        batch = (x, y) if weights is None else (x, y, weights)
        index, count = self.shard
        if count == 1:
            return batch
        rows = slice(index * self.rows // count, (index + 1) * self.rows // count)
        return tuple(part[rows] for part in batch)

    def _with_outliers(self, x: np.ndarray, y: np.ndarray, weights: np.ndarray | None, i: int):
        rng = np.random.default_rng([self.cfg.seed, 2, self.epoch, i])
        made = outliers.synthetic(x, self.outlier_count, rng)
        flat = np.full((len(made), self.num_classes), 1 / self.num_classes, dtype=y.dtype)
        if weights is not None:
            weights = np.concatenate([weights, np.ones(len(made), dtype=weights.dtype)])
        return np.concatenate([x, made]), np.concatenate([y, flat]), weights

    def crop_scale(self, epoch: int) -> float:
        """The smallest crop this epoch: cfg.crop_scale, moving linearly to cfg.crop_scale_end
        by the last epoch (so the last epochs see the images as evaluation does)."""
        start, end = self.cfg.crop_scale, self.cfg.crop_scale_end
        epochs = self.cfg.epochs or 1
        if end is None or epochs <= 1:
            return start
        return start + (end - start) * min(1.0, epoch / (epochs - 1))

    def _photo_batch(self, x: np.ndarray, y: np.ndarray, i: int):
        """Batch i of this epoch, augmented by the photo policy (and CutMix on cfg.cutmix of
        the batches), from its own random stream: the same whenever it is asked for."""
        rng = np.random.default_rng([self.cfg.seed, self.epoch, i])
        x = augment.photo_batch(x, rng, (self.crop_scale(self.epoch), 1.0), self.cfg.flip,
                                self.translate)
        if self.cfg.cutmix and rng.random() < self.cfg.cutmix:
            x, y = augment.cutmix(x, y, rng)
        return x, y
