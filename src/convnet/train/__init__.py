"""Train a preset on a dataset and publish a new model version.

    version = train(TrainConfig(preset="fast"), splits["train"], out="runs/cifar10")

The recipe follows airbench94 (Keller Jordan): a frozen 2x2 patch-whitening stem set from the
data, BatchNorm biases learning 64x faster than the rest, Nesterov SGD with a triangular schedule,
label smoothing, flip + translate augmentation, and flip + shift test-time augmentation.
Works on any Keras 3 backend (TensorFlow by default, JAX on GPUs).

This module chooses the loop and runs it; the parts live beside it:
    config.py      TrainConfig and the presets' defaults
    batches.py     the fit loop's input pipeline (augmentation, tf.data)
    recipe.py      initialisation, optimiser, lookahead and stem-freezing callbacks
    fit_loop.py    model.fit with its callbacks, time limit and data parallelism
    checkpoint.py  the per-epoch checkpoint that --resume continues from
    progress.py    what a run prints
    publish.py     export, scoring and metrics -> OUT/<next version>/
The device loop (JAX, whole run on the accelerator) is convnet.device_loop.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np

from convnet import models
from convnet.data import Split
from convnet.train import publish
from convnet.train.batches import Batches
from convnet.train.checkpoint import CHECKPOINT_DIR
from convnet.train.config import (
    DEVICE_EPOCHS,
    LOOPS,
    PRECISIONS,
    PRESET_EPOCHS,
    TrainConfig,
    TrainError,
    default_batch_size,
)
from convnet.train.fit_loop import data_parallel, run_fit
from convnet.train.progress import epoch_line
from convnet.train.recipe import WhitenBiasEpochs

__all__ = ["Batches", "CHECKPOINT_DIR", "Split", "TrainConfig", "TrainError", "WhitenBiasEpochs",
           "choose_loop", "split_validation", "train"]

log = logging.getLogger(__name__)


def split_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split | None]:
    if not fraction:
        return train, None
    if not 0 < fraction < 1:
        raise TrainError(f"--val-split must be between 0 and 1, got {fraction}")
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, int(len(train) * fraction))
    val, rest = order[:n_val], order[n_val:]
    return (Split(train.images[rest], train.labels[rest], train.classes),
            Split(train.images[val], train.labels[val], train.classes))


def choose_loop(cfg: TrainConfig, *, resume: bool = False, tensorboard: str | None = None) -> str:
    """"device" where it can run (JAX, an airbench preset, none of the options it lacks),
    else "fit"; an explicit "device" that cannot run is an error naming what stops it."""
    if cfg.loop not in LOOPS:
        raise TrainError(f"unknown loop {cfg.loop!r}: choose one of {', '.join(LOOPS)}")
    if cfg.loop == "fit":
        return "fit"
    backend = keras.backend.backend()
    blockers = [what for what, present in (
        (f"the {backend} backend (it needs jax)", backend != "jax"),
        (f"the {cfg.preset} preset", cfg.preset not in models.PRESETS),
        ("--data-parallel", cfg.data_parallel), ("--resume", resume),
        ("--tensorboard", tensorboard), ("--val-split", cfg.val_split)) if present]
    if not blockers:
        return "device"
    if cfg.loop == "device":
        raise TrainError("--loop device does not work with " + ", ".join(blockers))
    return "fit"


def train(cfg: TrainConfig, train_split: Split, out: str | os.PathLike, *,
          test_split: Split | None = None, resume: bool = False,
          tensorboard: str | None = None, verbose: int = 1,
          callbacks: tuple = ()) -> Path:
    """Train, export and publish `out/<next version>/`; return that folder.

    Raises KeyboardInterrupt after leaving a resumable checkpoint when interrupted."""
    started = time.time()
    keras.utils.set_random_seed(cfg.seed)
    out = Path(out)
    classes = train_split.classes
    loop = choose_loop(cfg, resume=resume, tensorboard=tensorboard)
    batch_size = cfg.batch_size or default_batch_size(cfg.preset, loop)
    cfg = replace(cfg, batch_size=batch_size)
    fit_split, val_split = split_validation(train_split, cfg.val_split, cfg.seed)
    if len(fit_split) < batch_size:
        raise TrainError(f"{len(fit_split)} training images is fewer than one batch of "
                         f"{batch_size}; lower --batch-size")
    if cfg.precision not in PRECISIONS:
        raise TrainError(f"unknown precision {cfg.precision!r}: choose one of "
                         f"{', '.join(PRECISIONS)}")
    epochs = cfg.epochs or (DEVICE_EPOCHS if loop == "device" else PRESET_EPOCHS)[cfg.preset]
    if loop == "device":
        model, seconds, epochs, history = _device_fit(cfg, fit_split, batch_size, epochs, verbose)
        return publish.publish(model, cfg, out, classes, epochs=epochs, test_split=test_split,
                               train_seconds=seconds, started=started, history=history,
                               num_train=len(fit_split))
    if epochs != int(epochs):
        raise TrainError(f"--epochs {epochs}: fractional epochs need the device loop (JAX)")
    epochs = int(epochs)
    batches = Batches(fit_split, cfg, len(classes))
    with data_parallel(cfg.data_parallel) as replicas:
        if replicas > 1 and batch_size % replicas:
            raise TrainError(f"--batch-size {batch_size} does not split evenly over "
                             f"{replicas} devices")
        model, history, seconds = run_fit(
            cfg, batches, val_split, epochs, out / CHECKPOINT_DIR, resume=resume,
            tensorboard=tensorboard, verbose=verbose, callbacks=callbacks)
    epochs = history[-1]["epoch"] + 1 if history else epochs  # the time limit may cut it
    return publish.publish(model, cfg, out, classes, epochs=epochs,
                           test_split=test_split or val_split, train_seconds=seconds,
                           started=started, history=history, num_train=len(fit_split),
                           replicas=replicas)


def _device_fit(cfg: TrainConfig, split: Split, batch_size: int, epochs: float, verbose: int):
    """Train with device_loop; returns (float32 Keras model, training seconds, epochs run,
    per-epoch log)."""
    from convnet import device_loop

    precision = cfg.precision
    if precision == "auto":
        precision = device_loop.default_precision()
    trainer = device_loop.trainer(cfg.preset, len(split.classes), batch_size, len(split),
                                  precision)
    recipe = device_loop.Recipe(
        epochs=epochs, batch_size=batch_size, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, bias_lr_scale=cfg.bias_lr_scale,
        label_smoothing=cfg.label_smoothing, flip=cfg.flip, translate=cfg.translate,
        seed=cfg.seed)
    total = math.ceil(epochs)
    last = time.perf_counter()

    def progress(epoch, loss):
        nonlocal last
        now = time.perf_counter()
        print(epoch_line(epoch, total, {"loss": loss}, now - last), flush=True)
        last = now

    log.info("device loop: %s, %s, %d images", device_loop.devices(), precision, len(split))
    result = trainer.run(split.images, split.labels, recipe=recipe, time_limit=cfg.time_limit,
                         on_epoch=progress if verbose else None)
    return result.to_keras(), result.seconds, round(result.epochs, 3), result.history
