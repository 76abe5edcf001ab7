"""The fit loop: the recipe through Keras `model.fit`, with per-epoch checkpoints, a time limit,
validation and data parallelism (any backend; the default on TensorFlow)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import keras
import numpy as np

from convnet.data import Split
from convnet.models import PixelStats
from convnet.train import checkpoint, multihost
from convnet.train.batches import Batches
from convnet.train.config import TrainConfig, TrainError
from convnet.train.progress import EpochProgress
from convnet.train.recipe import Lookahead, WhitenBiasEpochs, build_model

log = logging.getLogger(__name__)


class TimeLimit(keras.callbacks.Callback):
    """Stop after the last epoch that can finish within `seconds` of training time (judged by
    the previous epoch's duration): how the benchmark gives every preset the same budget.
    `cost(epoch)`, if given, is an epoch's relative cost, which scales the judgement from one
    epoch to the next (progressive resizing: pixels per image)."""

    def __init__(self, seconds: float, clock=time.time, cost=None):
        super().__init__()
        self.seconds, self.clock = seconds, clock
        self.cost = cost or (lambda epoch: 1)

    def on_train_begin(self, logs=None):
        self.started = self.epoch_started = self.clock()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        now = self.clock()
        next_epoch = (now - self.epoch_started) * self.cost(epoch + 1) / self.cost(epoch)
        if now + next_epoch > self.started + self.seconds:
            self.model.stop_training = True


def fit_steps(epochs: float, per_epoch: int) -> int:
    """Steps in a run of `epochs` (a part-epoch rounds up, as on the device loop)."""
    return max(1, math.ceil(epochs * per_epoch - 1e-9))


class StopAtStep(keras.callbacks.Callback):
    """End training after `total` steps of `per_epoch` each (from the start of the run, a
    resumed run's earlier epochs included): a fractional last epoch."""

    def __init__(self, total: int, per_epoch: int):
        super().__init__()
        self.total, self.per_epoch = total, per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch * self.per_epoch + batch + 1 >= self.total:
            self.model.stop_training = True


@contextlib.contextmanager
def data_parallel(enabled: bool):
    """Replicate the model on every device (every host's after multihost.initialize; else the
    local ones) and split each global batch between them:
    Keras's DataParallel distribution on JAX, MirroredStrategy on TensorFlow. Yields the
    number of replicas (1 when disabled)."""
    if not enabled:
        yield 1
        return
    backend = keras.backend.backend()
    if backend == "jax":
        devices = keras.distribution.list_devices()
        # Across hosts each process's Batches already yields its own slice (multihost.py).
        single_host = multihost.process_shard()[1] == 1
        keras.distribution.set_distribution(keras.distribution.DataParallel(
            devices=devices, auto_shard_dataset=single_host))
        try:
            yield len(devices)
        finally:
            keras.distribution.set_distribution(None)
    elif backend == "tensorflow":
        import tensorflow as tf

        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
        with strategy.scope():
            yield strategy.num_replicas_in_sync
    else:
        raise TrainError(f"data-parallel training is not supported on the {backend} backend")


def run_fit(cfg: TrainConfig, batches: Batches, val_split: Split | None, epochs: float,
            ckpt_dir: Path, stats: PixelStats, *, resume: bool, tensorboard: str | None = None,
            verbose: int = 1, callbacks: tuple = ()) -> tuple[keras.Model, list[dict], float]:
    """Build (or restore) and fit the model; runs inside any distribution scope. Returns the
    model, the per-epoch log (a resumed run's earlier epochs included) and training seconds.
    A fractional `epochs` ends part-way through the last epoch, where the schedule ends."""
    classes = batches.split.classes
    steps = batches.steps_per_epoch
    total = fit_steps(epochs, steps)
    whole = math.ceil(total / steps)
    model = build_model(cfg, batches.split.images, len(classes), total, stats,
                        steps_per_epoch=steps)
    initial_epoch, history, average = 0, [], None
    if resume:
        saved = checkpoint.load(ckpt_dir)
        checkpoint.restore(model, saved)
        initial_epoch, history, average = saved.epochs_done, saved.history, saved.lookahead
        batches.start_at(initial_epoch)
        log.info("resuming from %s after epoch %d", saved.path, initial_epoch)
    lookahead = None
    recipe: list[keras.callbacks.Callback] = []
    if cfg.preset != "tutorial" and keras.backend.backend() == "tensorflow":
        # Both assign variables between steps, which JAX's fit loop (holding its own copy of
        # the state) would ignore; on JAX the device loop does all of the recipe.
        recipe = [WhitenBiasEpochs()]
        if cfg.optimizer != "muon":  # airbench94_muon has no lookahead
            lookahead = Lookahead(total, steps, average=average)
            recipe.insert(0, lookahead)
    saver = checkpoint.SaveEveryEpoch(ckpt_dir, cfg, history, lookahead,
                                      write=multihost.is_writer())
    # The saver runs before the caller's callbacks, so an interrupt raised from one of those
    # at the end of an epoch finds that epoch saved.
    used: list[keras.callbacks.Callback] = [saver, *callbacks, *recipe]
    if total < whole * steps:
        used.append(StopAtStep(total, steps))
    if verbose:
        used.append(EpochProgress(whole, steps))
    if cfg.time_limit:
        used.append(TimeLimit(cfg.time_limit, cost=lambda epoch: batches.image_size(epoch) ** 2))
    if tensorboard:
        used.append(keras.callbacks.TensorBoard(tensorboard, write_graph=True))
    validation = None
    if val_split is not None:
        validation = (val_split.images, np.eye(len(classes), dtype="float32")[val_split.labels])

    data = batches.tf_dataset() if keras.backend.backend() == "tensorflow" else batches
    started = time.time()
    model.fit(data, epochs=whole, initial_epoch=initial_epoch, steps_per_epoch=steps,
              validation_data=validation, shuffle=False,  # Batches shuffles
              callbacks=used, verbose=0)
    return model, saver.history, time.time() - started
