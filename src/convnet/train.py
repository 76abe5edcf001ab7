"""Train a preset on a dataset and publish a new model version.

    run = train(TrainConfig(preset="fast"), splits, out="runs/cifar10")

The recipe follows airbench94 (Keller Jordan): a frozen 2x2 patch-whitening stem set from the
data, BatchNorm biases learning 64x faster than the rest, Nesterov SGD with a triangular schedule,
label smoothing, flip + translate augmentation, and flip + shift test-time augmentation.
Works on any Keras 3 backend (TensorFlow by default, JAX on GPUs).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import keras
import numpy as np

from convnet import augment, evaluate, export, modeldir, models
from convnet.data import Split
from convnet.optim import (
    LOOKAHEAD_EVERY,
    WHITEN_BIAS_EPOCHS,
    AirbenchSGD,
    TriangularSchedule,
    lookahead_decays,
)

log = logging.getLogger(__name__)
CHECKPOINT_DIR = ".checkpoint"  # inside the model root; hidden from version listing


@dataclass
class TrainConfig:
    preset: str = "fast"
    epochs: float | None = None  # None: the preset's default; fractions need the device loop
    batch_size: int | None = None  # None: the preset's default for the loop (default_batch_size)
    lr: float = 11.5  # per 1024 examples, airbench units (summed loss, coupled weight decay)
    momentum: float = 0.85  # Nesterov
    weight_decay: float = 0.0153  # per 1024 examples, airbench units
    bias_lr_scale: float = 64.0  # BatchNorm biases learn this much faster
    label_smoothing: float = 0.2
    flip: bool = True
    translate: int = 2  # pixels of random translation
    warmup: float = 0.23  # fraction of steps to reach the peak learning rate
    lr_start: float = 0.2  # learning rate at the first step, as a fraction of the peak
    lr_end: float = 0.07  # and at the last
    val_split: float = 0.0  # fraction of train held out for per-epoch validation
    seed: int = 0
    tta: bool = True  # evaluate the exported model with flip + shift views
    data: str = ""
    time_limit: float | None = None  # seconds of training; stop early at an epoch boundary
    data_parallel: bool = False  # split each global batch over all local devices
    loop: str = "auto"  # "fit" (model.fit), "device" (JAX, whole run on the device) or "auto"
    precision: str = "auto"  # "float32", "bfloat16" (mixed) or "auto" (bfloat16 on accelerators)


PRESET_EPOCHS = {"fast": 8, "quick": 6, "tutorial": 20}
# The device loop (JAX on a GPU) is fast enough that 12 epochs still beat airbench94's time
# there (bench/gpu_train.py): more epochs, more accuracy.
DEVICE_EPOCHS = {"fast": 12, "quick": 12}
# Batch sizes for the fit loop on a CPU. quick takes twice the steps per epoch at 512: on 2 cores
# an image costs the same at 512 as at 1024, and in a 6-epoch run the extra steps are worth about a
# point (bench/results/cpu_train.md). The device loop keeps 1024, the size its GPU figures used.
PRESET_BATCH = {"fast": 1024, "quick": 512, "tutorial": 1024}
DEVICE_BATCH = 1024
# The tutorial net has no BatchNorm; it trains with plain Adam like the original.
TUTORIAL_LR = 1e-3


class Batches(keras.utils.PyDataset):
    """Shuffled, augmented (uint8 images, one-hot labels) batches, as airbench augments: a
    random half of the images mirrored once, then every epoch a fresh random translation and,
    on odd epochs, every image mirrored. Each epoch's order and shifts come from
    `seed + epoch`, so a resumed run sees the same data as an uninterrupted one. The epoch's
    images are augmented in one vectorised pass the first time a batch of it is asked for.

    Endless: batch i belongs to epoch first_epoch + i // steps_per_epoch, and fit() is given
    `steps_per_epoch`, so one iterator serves the whole run: with a finite sequence Keras makes
    a new one every epoch, and on TensorFlow each switch could stall for 30 to 40 s with the
    CPU idle (quick preset, 2 cores; the cause is in `tf_dataset`)."""

    def __init__(self, split: Split, cfg: TrainConfig, num_classes: int, epoch: int = 0):
        super().__init__()
        self.split, self.cfg, self.num_classes = split, cfg, num_classes
        self.steps_per_epoch = len(split) // cfg.batch_size  # drop the ragged last batch
        self.base = split.images
        if cfg.flip:
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
        self.images = None

    def _epoch_images(self) -> np.ndarray:
        if self.images is None:
            images = augment.random_translate(self.base, self.cfg.translate, self.rng)
            self.images = images[:, :, ::-1] if self.cfg.flip and self.epoch % 2 else images
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

        size = self.cfg.batch_size
        signature = (tf.TensorSpec((size, *self.split.images.shape[1:]), tf.uint8),
                     tf.TensorSpec((size, self.num_classes), tf.float32))
        dataset = tf.data.Dataset.from_generator(
            lambda: (self[i] for i in itertools.count()), output_signature=signature)
        options = tf.data.Options()
        options.autotune.enabled = False
        return dataset.prefetch(4).with_options(options)

    def __getitem__(self, i):
        epoch, i = divmod(i, self.steps_per_epoch)
        if self.first_epoch + epoch != self.epoch:
            self._shuffle(self.first_epoch + epoch)
        idx = self.order[i * self.cfg.batch_size : (i + 1) * self.cfg.batch_size]
        x = self._epoch_images()[idx]
        y = np.eye(self.num_classes, dtype="float32")[self.split.labels[idx]]
        return x, y


def init_whitening(model: keras.Model, images: np.ndarray, seed: int) -> None:
    """Set the 2x2 stem from a random 5,000 of the images (models.whitening_kernel); bias 0."""
    layer = model.get_layer("whiten")
    kernel = models.whitening_kernel(models.whitening_sample(images, seed),
                                     layer.kernel_size[0], layer.filters)
    layer.set_weights([kernel.astype("float32"), np.zeros(layer.filters, "float32")])


def init_airbench(model: keras.Model, seed: int) -> None:
    """Kernels uniform in +-1/sqrt(fan_in); each conv starts as the identity on its first
    min(c_in, c_out) channels (airbench's dirac init). The stem is set by init_whitening."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            continue
        if layer.name == "whiten":
            continue
        shape = tuple(layer.kernel.shape)
        bound = 1 / np.sqrt(np.prod(shape[:-1]))
        kernel = rng.uniform(-bound, bound, shape).astype("float32")
        if len(shape) == 4:
            kh, kw, c_in, c_out = shape
            n = min(c_in, c_out)
            kernel[..., :n] = 0
            kernel[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1
        layer.kernel.assign(kernel)


class Lookahead(keras.callbacks.Callback):
    """Every `every` steps, pull an average of the weights (BatchNorm statistics included)
    towards them with a weight that grows as the cube of progress, and restart from the
    average; training ends on it. airbench's "lookahead"; a resumed run restarts the average."""

    def __init__(self, total_steps: int, steps_per_epoch: int, every: int = LOOKAHEAD_EVERY):
        super().__init__()
        self.per_epoch, self.every = steps_per_epoch, every
        self.decays = lookahead_decays(total_steps)
        self.step = None

    def on_train_begin(self, logs=None):
        self.variables = [v for v in self.model.weights if "float" in str(v.dtype)]
        self.average = [np.array(v.numpy(), "float32") for v in self.variables]

    def on_epoch_begin(self, epoch, logs=None):
        if self.step is None:
            self.step = epoch * self.per_epoch

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every:
            return
        keep = 1 - self.decays[min(self.step, len(self.decays) - 1)]
        for variable, average in zip(self.variables, self.average, strict=True):
            average += keep * (variable.numpy() - average)
            variable.assign(average)

    def on_train_end(self, logs=None):
        for variable, average in zip(self.variables, self.average, strict=True):
            variable.assign(average)


class WhitenBiasEpochs(keras.callbacks.Callback):
    """The stem's bias learns for the first `epochs` epochs only. Then the stem is frozen and
    the train function rebuilt, so later steps no longer backpropagate into it (measured on
    the fast net, 2 CPU cores: 0.2 s of a 3.7 s step)."""

    def __init__(self, epochs: int = WHITEN_BIAS_EPOCHS):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        stem = self.model.get_layer("whiten")
        if epoch >= self.epochs and stem.trainable:
            stem.trainable = False
            self.model.make_train_function(force=True)


def compile_model(model: keras.Model, cfg: TrainConfig, steps: int) -> None:
    if cfg.preset == "tutorial":
        optimizer = keras.optimizers.Adam(TUTORIAL_LR)
    else:
        # airbench's units (summed loss over a batch) -> Keras's (mean loss): lr * batch size.
        kilostep = 1024 * (1 + 1 / (1 - cfg.momentum))
        lr = cfg.lr / kilostep * cfg.batch_size
        l2 = cfg.weight_decay / cfg.lr
        optimizer = AirbenchSGD(
            learning_rate=TriangularSchedule(lr, steps, cfg.warmup, cfg.lr_start, cfg.lr_end),
            momentum=cfg.momentum,
            nesterov=True, l2=l2, bias_lr_scale=cfg.bias_lr_scale,
        )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                  label_smoothing=cfg.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


class TrainError(ValueError):
    """A training request that cannot run, with the reason."""


class AtomicCheckpoint(keras.callbacks.Callback):
    """After every epoch: model + optimizer state to last.keras and the epoch to state.json,
    each through a temporary file and a rename, so a kill leaves the previous one intact."""

    def __init__(self, directory: Path, cfg: TrainConfig):
        super().__init__()
        self.directory, self.cfg = directory, cfg

    def on_epoch_end(self, epoch, logs=None):
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / ".last.tmp.keras"
        self.model.save(tmp)
        os.replace(tmp, self.directory / "last.keras")
        modeldir.write_json_atomic(self.directory / "state.json",
                                   {"epochs_done": epoch + 1, "config": asdict(self.cfg)})


class TimeLimit(keras.callbacks.Callback):
    """Stop after the last epoch that can finish within `seconds` of training time (judged by
    the previous epoch's duration): how the benchmark gives every preset the same budget."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def on_train_begin(self, logs=None):
        self.started = self.epoch_started = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        if now + (now - self.epoch_started) > self.started + self.seconds:
            self.model.stop_training = True


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = []
    try:
        devices = [str(d) for d in keras.distribution.list_devices()]
    except Exception:  # not every backend lists devices
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "devices": devices,
            "platform": platform.platform()}


def plot_curves(csv_path: Path, png_path: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax1), ("accuracy", ax2)):
        for prefix in ("", "val_"):
            if rows[0].get(prefix + key, "NA") != "NA":
                ax.plot(epochs, [float(r[prefix + key]) for r in rows], marker="o",
                        label=(prefix or "train_") + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


@contextlib.contextmanager
def data_parallel(enabled: bool):
    """Replicate the model on every local device and split each global batch between them:
    Keras's DataParallel distribution on JAX, MirroredStrategy on TensorFlow. Yields the
    number of replicas (1 when disabled)."""
    if not enabled:
        yield 1
        return
    backend = keras.backend.backend()
    if backend == "jax":
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
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


LOOPS = ("auto", "fit", "device")
PRECISIONS = ("auto", "float32", "bfloat16")


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


def default_batch_size(preset: str, loop: str) -> int:
    return DEVICE_BATCH if loop == "device" else PRESET_BATCH.get(preset, DEVICE_BATCH)


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
    cfg = replace(cfg, batch_size=cfg.batch_size or default_batch_size(cfg.preset, loop))
    fit_split, val_split = split_validation(train_split, cfg.val_split, cfg.seed)
    if len(fit_split) < cfg.batch_size:
        raise TrainError(f"{len(fit_split)} training images is fewer than one batch of "
                         f"{cfg.batch_size}; lower --batch-size")
    if cfg.precision not in PRECISIONS:
        raise TrainError(f"unknown precision {cfg.precision!r}: choose one of "
                         f"{', '.join(PRECISIONS)}")
    ckpt_dir = out / CHECKPOINT_DIR
    epochs = cfg.epochs or (DEVICE_EPOCHS if loop == "device" else PRESET_EPOCHS)[cfg.preset]
    if loop == "device":
        model, seconds, epochs = _device_fit(cfg, fit_split, epochs, ckpt_dir, verbose)
        return publish(model, cfg, out, classes, epochs=epochs, test_split=test_split,
                       train_seconds=seconds, started=started, csv_log=ckpt_dir / "log.csv",
                       num_train=len(fit_split))
    if epochs != int(epochs):
        raise TrainError(f"--epochs {epochs}: fractional epochs need the device loop (JAX)")
    epochs = int(epochs)
    batches = Batches(fit_split, cfg, len(classes))
    with data_parallel(cfg.data_parallel) as replicas:
        if replicas > 1 and cfg.batch_size % replicas:
            raise TrainError(f"--batch-size {cfg.batch_size} does not split evenly over "
                             f"{replicas} devices")
        model, history, fit_started = _fit(
            cfg, batches, val_split, epochs, ckpt_dir, resume=resume, tensorboard=tensorboard,
            verbose=verbose, callbacks=callbacks)
    train_seconds = time.time() - fit_started
    epochs = history.epoch[-1] + 1 if history.epoch else epochs  # the time limit may cut it
    return publish(model, cfg, out, classes, epochs=epochs, test_split=test_split or val_split,
                   train_seconds=train_seconds, started=started, csv_log=ckpt_dir / "log.csv",
                   num_train=len(fit_split), replicas=replicas)


def _device_fit(cfg: TrainConfig, split: Split, epochs: float, ckpt_dir: Path, verbose: int):
    """Train with device_loop; returns (float32 Keras model, training seconds, epochs run)."""
    from convnet import device_loop

    precision = cfg.precision
    if precision == "auto":
        precision = device_loop.default_precision()
    trainer = device_loop.trainer(cfg.preset, len(split.classes), cfg.batch_size, len(split),
                                  precision)
    recipe = device_loop.Recipe(
        epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, bias_lr_scale=cfg.bias_lr_scale,
        label_smoothing=cfg.label_smoothing, flip=cfg.flip, translate=cfg.translate,
        seed=cfg.seed)
    total = math.ceil(epochs)

    def progress(epoch, loss):
        print(f"epoch {epoch + 1}/{total}  loss {loss:.4f}", flush=True)

    log.info("device loop: %s, %s, %d images", device_loop.devices(), precision, len(split))
    result = trainer.run(split.images, split.labels, recipe=recipe, time_limit=cfg.time_limit,
                         on_epoch=progress if verbose else None)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / ".log.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "accuracy", "loss"])
        writer.writeheader()
        writer.writerows(result.history)
    os.replace(tmp, ckpt_dir / "log.csv")
    return result.to_keras(), result.seconds, round(result.epochs, 3)


@contextlib.contextmanager
def dtype_policy(name: str):
    """Layers built inside use this Keras dtype policy ("mixed_bfloat16": bf16 compute,
    float32 weights)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def as_float32(model: keras.Model, preset: str) -> keras.Model:
    """The same weights in a float32 model: what is saved and exported, whatever trained."""
    if model.dtype_policy.name == "float32":
        return model
    clone = models.build(preset, model.output.shape[-1])
    values = {v.path: v.numpy() for v in model.variables}
    for variable in clone.variables:
        variable.assign(values[variable.path].astype(variable.dtype))
    return clone


def _fit(cfg: TrainConfig, batches: Batches, val_split: Split | None, epochs: int,
         ckpt_dir: Path, *, resume: bool, tensorboard: str | None, verbose: int,
         callbacks: tuple):
    """Build (or restore) and fit the model; runs inside any distribution scope."""
    classes = batches.split.classes
    initial_epoch = 0
    if resume:
        state_file = ckpt_dir / "state.json"
        if not state_file.is_file():
            raise TrainError(f"--resume: no checkpoint in {ckpt_dir}")
        state = json.loads(state_file.read_text())
        initial_epoch = state["epochs_done"]
        model = keras.models.load_model(ckpt_dir / "last.keras")
        batches.start_at(initial_epoch)
        log.info("resuming from %s after epoch %d", ckpt_dir, initial_epoch)
    else:
        with dtype_policy("mixed_bfloat16" if cfg.precision == "bfloat16" else "float32"):
            model = models.build(cfg.preset, len(classes))
        if cfg.preset != "tutorial":
            init_airbench(model, cfg.seed)
            init_whitening(model, batches.split.images, cfg.seed)
            model.get_layer("whiten").trainable = True  # the bias; AirbenchSGD holds the kernel
        compile_model(model, cfg, steps=batches.steps_per_epoch * epochs)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    csv_log = ckpt_dir / "log.csv"
    callbacks = [AtomicCheckpoint(ckpt_dir, cfg),
                 keras.callbacks.CSVLogger(str(csv_log), append=resume), *callbacks]
    if cfg.preset != "tutorial" and keras.backend.backend() == "tensorflow":
        # Both assign variables between steps, which JAX's fit loop (holding its own copy of
        # the state) would ignore; on JAX the device loop does all of the recipe.
        steps = batches.steps_per_epoch
        callbacks += [Lookahead(steps * epochs, steps), WhitenBiasEpochs()]
    if cfg.time_limit:
        callbacks.append(TimeLimit(cfg.time_limit))
    if tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(tensorboard, write_graph=True))
    validation = None
    if val_split is not None:
        validation = (val_split.images, np.eye(len(classes), dtype="float32")[val_split.labels])

    data = batches.tf_dataset() if keras.backend.backend() == "tensorflow" else batches
    fit_started = time.time()
    history = model.fit(data, epochs=epochs, initial_epoch=initial_epoch,
                        steps_per_epoch=batches.steps_per_epoch, validation_data=validation,
                        shuffle=False,  # Batches shuffles
                        callbacks=callbacks, verbose=verbose)
    return model, history, fit_started


def publish(model: keras.Model, cfg: TrainConfig, out: Path, classes: list[str], *, epochs: int,
            test_split: Split | None, train_seconds: float, started: float, csv_log: Path,
            num_train: int, replicas: int = 1) -> Path:
    """Export the trained model into a staging folder, evaluate it and rename it into place."""
    model = as_float32(model, cfg.preset)
    served = models.with_softmax(model)
    staged = modeldir.staging_dir(out)
    try:
        served.save(staged / modeldir.KERAS_FILE)
        modeldir.write_json_atomic(staged / modeldir.LABELS_FILE, classes)
        check = test_split.images[:64] if test_split is not None else None
        if keras.backend.backend() == "tensorflow":
            onnx_diff = export.export_onnx(served, staged / modeldir.ONNX_FILE,
                                           check_images=check)
            predictor = evaluate.load_predictor(staged)
        else:  # tf2onnx needs TensorFlow: export later with `convnet export` where it is
            log.warning("no ONNX export on the %s backend; run `convnet export --model %s` on "
                        "a machine with TensorFlow", keras.backend.backend(), out)
            onnx_diff = None
            predictor = evaluate.keras_predictor(served, classes, staged)
        metrics = {
            "preset": cfg.preset, "epochs": epochs, "backend": keras.backend.backend(),
            "keras_version": keras.__version__, "train_seconds": round(train_seconds, 1),
            "hardware": hardware(), "data": cfg.data, "num_train": num_train,
            "params": int(model.count_params()), "flops_per_image": models.count_flops(model),
            "onnx_max_abs_diff": onnx_diff, "replicas": replicas,
        }
        if test_split is not None:
            report = evaluate.evaluate(predictor, test_split.images, test_split.labels,
                                       tta=cfg.tta)
            metrics.update(
                accuracy=report["accuracy"], accuracy_no_tta=report["accuracy_no_tta"],
                top5_accuracy=report["top5_accuracy"], tta=cfg.tta,
                per_class_accuracy=report["per_class_accuracy"],
                num_test=report["num_images"], confusion_matrix=report["confusion_matrix"],
            )
            evaluate.plot_confusion(report["confusion_matrix"], classes,
                                    staged / "confusion.png")
        if csv_log.is_file():
            shutil.copy(csv_log, staged / "log.csv")
            plot_curves(csv_log, staged / "curves.png")
        metrics["total_seconds"] = round(time.time() - started, 1)
        modeldir.write_json_atomic(staged / modeldir.METRICS_FILE, metrics)
        modeldir.write_json_atomic(staged / modeldir.CONFIG_FILE, asdict(cfg))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return modeldir.publish(out, staged)
