"""Train a preset on a dataset and publish a new model version.

    version = train(TrainConfig(preset="fast"), splits["train"], out="runs/cifar10")

The recipe follows airbench94 (Keller Jordan): a frozen patch-whitening stem set from the data,
BatchNorm biases learning 64x faster than the rest, Nesterov SGD with a triangular schedule,
label smoothing, flip + translate augmentation (for photos a batch at a time, with CutMix), and
flip + shift test-time augmentation. The network normalises by its own training data's pixel
statistics. Class imbalance: classes weighted by inverse frequency (cfg.class_weight). Works on
any Keras 3 backend (TensorFlow by default, JAX on GPUs).

This module chooses the loop and runs it; the parts live beside it:
    config.py      TrainConfig and the presets' defaults
    batches.py     the fit loop's input pipeline (augmentation, tf.data)
    recipe.py      initialisation, optimiser, lookahead and stem-freezing callbacks
    fit_loop.py    model.fit with its callbacks, time limit and data parallelism
    multihost.py   one process per host (--distributed): joining, batch slices, who publishes
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
from dataclasses import asdict, replace
from pathlib import Path

import keras
import numpy as np

from convnet import models
from convnet.cpu import BF16_FLAGS, computes_bf16, cpu_flags
from convnet.data import Split
from convnet.train import multihost, publish
from convnet.train.batches import Batches
from convnet.train.checkpoint import CHECKPOINT_DIR
from convnet.train.config import (
    AUGMENTS,
    CLASS_WEIGHTS,
    LOOPS,
    OPTIMIZERS,
    PRECISIONS,
    PROGRESSIVE_OFF,
    TrainConfig,
    TrainError,
    check_progressive,
    default_batch_size,
    default_epochs,
    default_optimizer,
    default_progressive,
    with_augmentation,
)
from convnet.train.fit_loop import data_parallel, fit_steps, run_fit
from convnet.train.progress import epoch_line
from convnet.train.recipe import WhitenBiasEpochs

__all__ = ["Batches", "CHECKPOINT_DIR", "Split", "TrainConfig", "TrainError", "WhitenBiasEpochs",
           "choose_loop", "class_weights", "split_validation", "train"]

log = logging.getLogger(__name__)
# cfg.class_weight "auto" weights the classes when the largest has this many times the images
# of the smallest (bench/results/flowers_probes.md)
IMBALANCE_RATIO = 2.0


# TrainConfig fields only SGD reads: a run that resolves to Muon refuses them changed
SGD_SETTINGS = ("lr", "momentum", "weight_decay", "bias_lr_scale", "warmup", "lr_start",
                "lr_end")


def training_on_cpu() -> bool:
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.config.list_physical_devices("GPU")
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "torch":
        import torch

        return not torch.cuda.is_available()
    return False


def fit_precision() -> str:
    """What --precision auto means on model.fit: bfloat16 on a CPU with bfloat16 instructions
    (1.4x float32 on the fast preset: bench/results/train_stacks.md), else float32."""
    return "bfloat16" if training_on_cpu() and computes_bf16(cpu_flags()) else "float32"


def check_precision(precision: str) -> None:
    """bfloat16 on a CPU that has no bfloat16 instructions would be emulated, slower than
    float32: refuse it by name (a CPU whose flags cannot be read gets the benefit of doubt)."""
    if precision != "bfloat16" or not training_on_cpu():
        return
    if computes_bf16(cpu_flags()) is False:
        raise TrainError("--precision bfloat16: this CPU has no bfloat16 instructions "
                         f"({' or '.join(sorted(BF16_FLAGS))}), so it would run emulated and "
                         "slower than float32; use --precision float32")


def split_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split | None]:
    """Hold out `fraction` of each class (stratified; at least one image of a class stays in
    training), images in their original order."""
    if not fraction:
        return train, None
    if not 0 < fraction < 1:
        raise TrainError(f"--val-split must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    held = []
    for c in range(len(train.classes)):
        members = np.flatnonzero(train.labels == c)
        n_val = min(len(members) - 1, round(len(members) * fraction))
        if n_val > 0:
            held.append(rng.choice(members, n_val, replace=False))
    val = np.sort(np.concatenate(held)) if held else np.zeros(0, np.intp)
    if not len(val):
        raise TrainError(f"--val-split {fraction} holds out no image of {len(train)}")
    rest = np.setdiff1d(np.arange(len(train)), val)
    return (Split(train.images[rest], train.labels[rest], train.classes),
            Split(train.images[val], train.labels[val], train.classes))


def class_weights(policy: str, split: Split) -> np.ndarray | None:
    """Per-class loss weights N / (C * n_c) (their mean over the images is 1, so the learning
    rate means the same), or None for unweighted: policy "none", or "auto" when the classes are
    within IMBALANCE_RATIO of each other. A class without images gets 0."""
    if policy not in CLASS_WEIGHTS:
        raise TrainError(f"unknown class weighting {policy!r}: choose one of "
                         f"{', '.join(CLASS_WEIGHTS)}")
    counts = np.bincount(split.labels, minlength=len(split.classes)).astype(np.float64)
    present = counts[counts > 0]
    if policy == "none" or present.max() < IMBALANCE_RATIO * present.min():
        return None
    weights = np.divide(len(split), len(present) * counts, out=np.zeros_like(counts),
                        where=counts > 0)
    return weights.astype(np.float32)


def _image_size(cfg: TrainConfig, *splits: Split | None) -> int:
    """The side of the splits' images, which must be square, agree, and match cfg.image_size
    if that is set."""
    sizes = {tuple(s.images.shape[1:]) for s in splits if s is not None and len(s)}
    if len(sizes) != 1:
        raise TrainError(f"training and test images differ in shape: {sorted(sizes)}")
    height, width, channels = sizes.pop()
    if height != width or channels != 3:
        raise TrainError(f"images must be square RGB (S, S, 3), got {(height, width, channels)}")
    if cfg.image_size is not None and cfg.image_size != height:
        raise TrainError(f"--image-size {cfg.image_size}, but the images are {height}x{height}")
    if height < models.MIN_IMAGE_SIZE:
        raise TrainError(f"images of {height} px are too small: at least "
                         f"{models.MIN_IMAGE_SIZE}")
    return height


def choose_loop(cfg: TrainConfig, *, resume: bool = False, tensorboard: str | None = None,
                weighted: bool = False) -> str:
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
        ("--tensorboard", tensorboard), ("--val-split", cfg.val_split),
        (f"--image-size {cfg.image_size} (it trains at 32 px only)",
         cfg.image_size not in (None, 32)),
        ("--augment photo", cfg.augment == "photo"), ("--outliers", cfg.outliers),
        ("--optimizer muon", cfg.optimizer == "muon"),
        ("--progressive", cfg.progressive not in (None, PROGRESSIVE_OFF)),
        ("class weights (--class-weight none turns them off)", weighted)) if present]
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
    if cfg.augment not in AUGMENTS:
        raise TrainError(f"unknown augmentation {cfg.augment!r}: choose one of "
                         f"{', '.join(AUGMENTS)}")
    if cfg.precision not in PRECISIONS:
        raise TrainError(f"unknown precision {cfg.precision!r}: choose one of "
                         f"{', '.join(PRECISIONS)}")
    check_precision(cfg.precision)
    if cfg.optimizer not in OPTIMIZERS:
        raise TrainError(f"unknown optimizer {cfg.optimizer!r}: choose one of "
                         f"{', '.join(OPTIMIZERS)}")
    if cfg.preset == "tutorial" and cfg.optimizer != "auto":
        raise TrainError("--optimizer: the tutorial network trains with Adam, as the tutorial "
                         "did; sgd and muon are for the airbench presets")
    if not 0 <= cfg.outliers <= 1:
        raise TrainError(f"--outliers is a fraction of the batch, from 0 to 1; got {cfg.outliers}")
    cfg = with_augmentation(replace(cfg, image_size=_image_size(cfg, train_split, test_split)))
    fit_split, val_split = split_validation(train_split, cfg.val_split, cfg.seed)
    weights = class_weights(cfg.class_weight, fit_split)
    loop = choose_loop(cfg, resume=resume, tensorboard=tensorboard, weighted=weights is not None)
    optimizer = cfg.optimizer
    if optimizer == "auto":
        optimizer = default_optimizer(cfg.preset, loop, cfg.augment, len(fit_split))
    batch_size = cfg.batch_size or default_batch_size(cfg.preset, loop, len(fit_split),
                                                      optimizer)
    given_epochs = cfg.epochs
    epochs = cfg.epochs or default_epochs(cfg.preset, loop, len(fit_split), optimizer)
    epochs = int(epochs) if float(epochs).is_integer() else float(epochs)  # 8, not 8.0
    precision = cfg.precision
    if precision == "auto" and loop == "fit":  # the device loop decides its own
        precision = fit_precision() if cfg.preset != "tutorial" else "float32"
    cfg = replace(cfg, batch_size=batch_size, epochs=epochs, optimizer=optimizer,
                  precision=precision)
    if cfg.progressive is None:
        cfg = replace(cfg, progressive=default_progressive(cfg, loop, keras.backend.backend(),
                                                           epochs_given=bool(given_epochs)))
    elif cfg.progressive == PROGRESSIVE_OFF:
        cfg = replace(cfg, progressive=None)
    check_progressive(cfg, loop, keras.backend.backend())
    if optimizer == "muon":
        changed = [name for name in SGD_SETTINGS
                   if getattr(cfg, name) != getattr(TrainConfig, name)]
        if changed:
            raise TrainError(f"{', '.join(changed)}: SGD's settings, which Muon does not use "
                             "(it runs airbench94_muon's); add --optimizer sgd to train with them")
    if len(fit_split) < batch_size:
        raise TrainError(f"{len(fit_split)} training images is fewer than one batch of "
                         f"{batch_size}; lower --batch-size")
    stats = models.pixel_stats(fit_split.images)
    counts = fit_split.class_counts()
    facts = {"class_counts": counts, "normalisation": asdict(stats),
             "class_weights": None if weights is None else
             {c: round(float(w), 4) for c, w in zip(classes, weights, strict=True)}}
    if verbose:
        low = ""
        if cfg.progressive:
            side, first = cfg.progressive
            low = f" (the first {first} at {side}x{side})"
        print(f"{len(fit_split)} training images of {cfg.image_size}x{cfg.image_size} px, "
              f"batch {batch_size}, {epochs:g} epochs{low}; per class: " + ", ".join(
                  f"{c} {n}" for c, n in counts.items()), flush=True)
    if loop == "device":
        model, seconds, epochs, history = _device_fit(cfg, fit_split, batch_size, epochs, stats,
                                                      verbose)
        return publish.publish(model, cfg, out, classes, epochs=epochs, test_split=test_split,
                               train_seconds=seconds, started=started, history=history,
                               num_train=len(fit_split), facts=facts,
                               calibration_split=val_split or test_split)
    process, processes = multihost.process_shard()
    if processes > 1 and (resume or cfg.time_limit or not cfg.data_parallel):
        # A time limit is judged by each process's own clock, so they could stop apart.
        raise TrainError("multi-host training needs --data-parallel and works without "
                         "--resume and --time-limit")
    batches = Batches(fit_split, cfg, len(classes), weights=weights,
                      shard=(process, processes))
    with data_parallel(cfg.data_parallel) as replicas:
        if replicas > 1 and batch_size % replicas:
            raise TrainError(f"--batch-size {batch_size} does not split evenly over "
                             f"{replicas} devices")
        model, history, seconds = run_fit(
            cfg, batches, val_split, epochs, out / CHECKPOINT_DIR, stats, resume=resume,
            tensorboard=tensorboard, verbose=verbose, callbacks=callbacks)
    if history and history[-1]["epoch"] + 1 < math.ceil(epochs):  # the time limit cut it
        epochs = history[-1]["epoch"] + 1
    elif epochs != int(epochs):  # the steps run, as the device loop reports them
        epochs = round(fit_steps(epochs, batches.steps_per_epoch) / batches.steps_per_epoch, 4)
    if processes > 1:
        model = multihost.local_copy(model, cfg.preset)
        if process != 0:  # process 0 publishes; wait for it and name its version
            return out / str(multihost.share_version(0))
    version = publish.publish(model, cfg, out, classes, epochs=epochs,
                              test_split=test_split or val_split, train_seconds=seconds,
                              started=started, history=history, num_train=len(fit_split),
                              replicas=replicas, facts=facts,
                              calibration_split=val_split or test_split)
    if processes > 1:
        multihost.share_version(int(version.name))
    return version


def _device_fit(cfg: TrainConfig, split: Split, batch_size: int, epochs: float,
                stats: models.PixelStats, verbose: int):
    """Train with device_loop; returns (float32 Keras model, training seconds, epochs run,
    per-epoch log)."""
    from convnet import device_loop

    precision = cfg.precision
    if precision == "auto":
        precision = device_loop.default_precision()
    trainer = device_loop.trainer(cfg.preset, len(split.classes), batch_size, len(split),
                                  precision, stats=stats)
    recipe = device_loop.Recipe(
        epochs=epochs, batch_size=batch_size, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, bias_lr_scale=cfg.bias_lr_scale,
        label_smoothing=cfg.label_smoothing, flip=cfg.flip, translate=cfg.translate or 0,
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
