"""The JAX backend's training loop: the whole run on the accelerator.

`model.fit` costs Python work and a host-to-device copy on every step; on a GPU, where a step of
the `fast` network takes a few milliseconds, that overhead is a large share of the run. Here the
dataset is copied to the device once, augmentation happens there, and each epoch is one compiled
`lax.scan` over its batches that calls the Keras model through its stateless API. Compiled
functions are cached per (preset, classes, batch size, dataset size, precision), so a second run in
the same process starts at once.

The recipe is airbench94's, written out here rather than through a Keras optimizer because some
of it has no Keras counterpart:
- a 2x2 patch-whitening stem set from the data (eigenvectors of the uncentred patch second
  moments); its kernel stays frozen, its bias trains for the first `whiten_bias_epochs` epochs;
- conv kernels start as identities on their first input channels (dirac), the rest uniform
  +-1/sqrt(fan_in);
- Nesterov SGD on the summed loss, with coupled L2 decay, BatchNorm biases at 64x the learning
  rate, and a triangular schedule (start 0.2 of peak, peak at 23% of the steps, end at 0.07);
- label smoothing 0.2; every 5 steps the weights and BatchNorm statistics are pulled towards, and
  replaced by, an exponential average whose decay grows as the cube of progress ("lookahead");
  the run ends on that average;
- augmentation: half the images mirrored once, then every epoch a fresh random translation of up
  to 2 pixels (reflected borders) and all images mirrored on odd epochs;
- test-time augmentation: logits averaged over the image, its mirror and one-pixel diagonal shifts.

    result = DeviceTrainer(...).run(train_images, train_labels, test_images, test_labels)
    model = result.to_keras()
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import keras
import numpy as np

from convnet import models
from convnet.optim import LOOKAHEAD_EVERY, WHITEN_BIAS_EPOCHS, lookahead_decays, lr_factors

FROZEN, WHITEN_BIAS, NORM_BIAS, WEIGHT = range(4)
EVAL_CHUNK = 1000


@dataclass(frozen=True)
class Recipe:
    epochs: float = 10.0
    batch_size: int = 1024
    lr: float = 11.5  # per 1024 examples, on the summed loss
    momentum: float = 0.85
    weight_decay: float = 0.0153  # per 1024 examples
    bias_lr_scale: float = 64.0
    label_smoothing: float = 0.2
    flip: bool = True
    translate: int = 2
    whiten_bias_epochs: int = WHITEN_BIAS_EPOCHS
    lookahead_every: int = LOOKAHEAD_EVERY
    lr_start: float = 0.2
    lr_peak_at: float = 0.23
    lr_end: float = 0.07
    seed: int = 0


def _padded(values: np.ndarray, multiple: int = 1024) -> np.ndarray:
    """Schedules padded to a multiple of `multiple` entries: one compiled shape for any run
    length up to that."""
    size = -(-len(values) // multiple) * multiple
    return np.concatenate([values, np.full(size - len(values), values[-1], values.dtype)])


@dataclass
class RunResult:
    trainer: DeviceTrainer
    trainable: list
    non_trainable: list
    seconds: float
    accuracy: float  # test accuracy with test-time augmentation (nan without a test set)
    accuracy_no_tta: float
    epochs: float
    history: list[dict] = field(default_factory=list)

    def to_keras(self) -> keras.Model:
        """The trained weights in a fresh float32 model (whitening stem frozen, as built)."""
        values = dict(zip(self.trainer.trainable_paths, self.trainable, strict=True))
        values.update(zip(self.trainer.non_trainable_paths, self.non_trainable, strict=True))
        model = models.build(self.trainer.preset, self.trainer.num_classes,
                             stats=self.trainer.stats)
        for variable in model.variables:
            variable.assign(np.asarray(values[variable.path], dtype=variable.dtype))
        return model


class DeviceTrainer:
    """Compiled training and evaluation for one (preset, classes, batch, data size, precision)."""

    def __init__(self, preset: str, num_classes: int, batch_size: int, num_train: int,
                 precision: str = "float32", scan: bool | None = None,
                 stats: models.PixelStats = models.CIFAR_STATS):
        if preset not in models.PRESETS:
            raise ValueError(f"the device loop trains the airbench presets "
                             f"({', '.join(models.PRESETS)}), not {preset!r}")
        if num_train < batch_size:
            raise ValueError(f"{num_train} training images is fewer than one batch of "
                             f"{batch_size}")
        self.preset, self.num_classes, self.stats = preset, num_classes, stats
        self.batch_size, self.num_train = batch_size, num_train
        self.batches_per_epoch = num_train // batch_size
        policy = "mixed_bfloat16" if precision == "bfloat16" else "float32"
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            self.model = models.build(preset, num_classes, stats=stats)
        finally:
            keras.config.set_dtype_policy(previous)
        self.model.get_layer("whiten").trainable = True  # its bias trains; the kernel is masked
        self.trainable_paths = [v.path for v in self.model.trainable_variables]
        self.non_trainable_paths = [v.path for v in self.model.non_trainable_variables]
        self.kinds = [self._kind(v) for v in self.model.trainable_variables]
        self._shapes = [tuple(v.shape) for v in self.model.trainable_variables]
        whiten = self.model.get_layer("whiten")
        self.whiten_size, self.whiten_width = whiten.kernel_size[0], whiten.filters
        # One compiled scan per epoch on accelerators; on CPUs XLA runs convolutions inside a
        # loop many times slower (measured: 20x), so there each step is its own call.
        self.scan = jax.default_backend() != "cpu" if scan is None else scan
        self._epoch = jax.jit(self._epoch_impl, static_argnames=("steps", "translate"),
                              donate_argnums=(0,))
        self._batches = jax.jit(self._batches_impl, static_argnames=("steps", "translate"))
        self._step_jit = jax.jit(self._step, donate_argnums=(0,))
        self._init = jax.jit(self._init_impl)
        self._prepare = jax.jit(self._prepare_impl, static_argnames=("translate", "flip"))
        self._evaluate = jax.jit(self._evaluate_impl)

    @staticmethod
    def _kind(variable) -> int:
        if variable.path.startswith("whiten/"):
            return FROZEN if variable.path.endswith("kernel") else WHITEN_BIAS
        if variable.path.endswith("beta"):
            return NORM_BIAS
        return WEIGHT

    # ---- initial weights -------------------------------------------------------------------

    def _whiten_kernel(self, images):
        return models.whitening_kernel(images, self.whiten_size, self.whiten_width, self.stats,
                                       xp=jnp)

    def _init_impl(self, key, whiten_images):
        params = []
        keys = jax.random.split(key, len(self._shapes))
        for shape, kind, k in zip(self._shapes, self.kinds, keys, strict=True):
            if kind == FROZEN:
                params.append(self._whiten_kernel(whiten_images))
            elif len(shape) == 1:
                params.append(jnp.zeros(shape, jnp.float32))
            else:
                fan_in = math.prod(shape[:-1])
                bound = 1 / math.sqrt(fan_in)
                p = jax.random.uniform(k, shape, jnp.float32, -bound, bound)
                if len(shape) == 4:  # identity on the first min(c_in, c_out) channels
                    kh, kw, c_in, c_out = shape
                    n = min(c_in, c_out)
                    eye = jnp.zeros((kh, kw, c_in, n)).at[kh // 2, kw // 2].set(jnp.eye(c_in, n))
                    p = p.at[..., :n].set(eye)
                params.append(p)
        non_trainable = [jnp.ones(v.shape, jnp.float32) if v.path.endswith("variance")
                         else jnp.zeros(v.shape, jnp.float32)
                         for v in self.model.non_trainable_variables]
        return params, non_trainable

    # ---- data ------------------------------------------------------------------------------

    @staticmethod
    def _prepare_impl(images, key, *, translate, flip):
        """Mirror a random half once (odd epochs mirror everything again) and pad for shifts."""
        if flip:
            mask = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
            images = jnp.where(mask, images[:, :, ::-1], images)
        if translate:
            pad = ((0, 0), (translate, translate), (translate, translate), (0, 0))
            images = jnp.pad(images, pad, mode="reflect")
        return images

    # ---- training --------------------------------------------------------------------------

    def _epoch_impl(self, state, padded, labels, hp, key, flip_all, whiten_on, *, steps,
                    translate):
        xs, ys = self._batches_impl(padded, labels, key, flip_all, steps=steps,
                                    translate=translate)
        step = functools.partial(self._step, hp=hp, whiten_on=whiten_on)
        state, (losses, correct) = jax.lax.scan(step, state, (xs, ys))
        return state, losses.sum(), correct.sum()

    def _epoch_by_step(self, state, padded, labels, hp, key, flip_all, whiten_on, *, steps,
                       translate):
        xs, ys = self._batches(padded, labels, key, flip_all, steps=steps, translate=translate)
        loss = correct = 0
        for i in range(steps):
            state, (step_loss, step_correct) = self._step_jit(state, (xs[i], ys[i]), hp=hp,
                                                               whiten_on=whiten_on)
            loss, correct = loss + step_loss, correct + step_correct
        return state, loss, correct

    def _batches_impl(self, padded, labels, key, flip_all, *, steps, translate):
        """This epoch's (steps, batch, H, W, C) images and (steps, batch) labels."""
        n, size = padded.shape[0], padded.shape[1] - 2 * translate
        k_shift, k_perm = jax.random.split(key)
        if translate:
            shifts = jax.random.randint(k_shift, (n, 2), 0, 2 * translate + 1)
            crop = jax.vmap(lambda im, s: jax.lax.dynamic_slice(
                im, (s[0], s[1], 0), (size, size, im.shape[-1])))
            images = crop(padded, shifts)
        else:
            images = padded
        images = jnp.where(flip_all, images[:, :, ::-1], images)
        order = jax.random.permutation(k_perm, n)[: steps * self.batch_size]
        xs = images[order].reshape(steps, self.batch_size, *images.shape[1:])
        ys = labels[order].reshape(steps, self.batch_size)
        return xs, ys

    def _step(self, state, batch, *, hp, whiten_on):
        x, y = batch
        params, stats, momenta, avg_params, avg_stats, i = state
        num_classes, smoothing = self.num_classes, hp["label_smoothing"]

        def loss_fn(params):
            logits, new_stats = self.model.stateless_call(params, stats, x, training=True)
            logits = logits.astype(jnp.float32)
            target = jax.nn.one_hot(y, num_classes) * (1 - smoothing) + smoothing / num_classes
            loss = -(target * jax.nn.log_softmax(logits)).sum()
            return loss, (new_stats, (logits.argmax(-1) == y).sum())

        (loss, (stats, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        factor = hp["lr_factors"][i]
        mu = hp["momentum"]
        new_params, new_momenta = [], []
        for p, g, m, kind in zip(params, grads, momenta, self.kinds, strict=True):
            if kind == FROZEN:
                new_params.append(p)
                new_momenta.append(m)
                continue
            scale = hp["bias_lr_scale"] if kind == NORM_BIAS else 1.0
            lr = hp["lr"] * scale
            g = g + (hp["weight_decay"] / lr) * p  # coupled L2, same decay for every group
            m2 = mu * m + g
            p2 = p - lr * factor * (g + mu * m2)
            if kind == WHITEN_BIAS:
                p2, m2 = jnp.where(whiten_on, p2, p), jnp.where(whiten_on, m2, m)
            new_params.append(p2)
            new_momenta.append(m2)
        i = i + 1
        # lookahead: every few steps pull the average towards the weights and restart from it
        due = (i % hp["lookahead_every"]) == 0
        keep = 1 - hp["decays"][i]
        avg_params = [jnp.where(due, a + keep * (p - a), a)
                      for a, p in zip(avg_params, new_params, strict=True)]
        avg_stats = [jnp.where(due, a + keep * (s - a), a)
                     for a, s in zip(avg_stats, stats, strict=True)]
        new_params = [jnp.where(due, a, p) for a, p in zip(avg_params, new_params, strict=True)]
        stats = [jnp.where(due, a, s) for a, s in zip(avg_stats, stats, strict=True)]
        return (new_params, stats, new_momenta, avg_params, avg_stats, i), (loss, correct)

    # ---- evaluation ------------------------------------------------------------------------

    def _logits(self, params, stats, x):
        return self.model.stateless_call(params, stats, x, training=False)[0].astype(jnp.float32)

    def _evaluate_impl(self, params, stats, x):
        """(plain logits, test-time-augmented logits) for one chunk of uint8 images."""
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        h, w = x.shape[1:3]
        views = [x, padded[:, :h, :w], padded[:, 2:, 2:]]
        views = jnp.concatenate([v for view in views for v in (view, view[:, :, ::-1])])
        logits = self._logits(params, stats, views).reshape(6, x.shape[0], -1)
        mirrored = (logits[0::2] + logits[1::2]) / 2  # image, shift (-1,-1), shift (+1,+1)
        return logits[0], mirrored[0] / 2 + (mirrored[1] + mirrored[2]) / 4

    def predict(self, params, stats, images: np.ndarray):
        """Device arrays of plain and augmented logits for uint8 images, in chunks."""
        plain, tta = [], []
        for start in range(0, len(images), EVAL_CHUNK):
            chunk = images[start:start + EVAL_CHUNK]
            short = EVAL_CHUNK - len(chunk)
            if short:  # one compiled shape: pad the last chunk, drop the padding after
                chunk = np.concatenate([chunk, np.zeros((short, *chunk.shape[1:]), chunk.dtype)])
            a, b = self._evaluate(params, stats, jnp.asarray(chunk))
            plain.append(a[: EVAL_CHUNK - short])
            tta.append(b[: EVAL_CHUNK - short])
        return jnp.concatenate(plain), jnp.concatenate(tta)

    # ---- one run ---------------------------------------------------------------------------

    def run(self, images: np.ndarray, labels: np.ndarray, test_images: np.ndarray | None = None,
            test_labels: np.ndarray | None = None, recipe: Recipe = Recipe(), *,
            time_limit: float | None = None, on_epoch=None) -> RunResult:
        """Train from scratch on uint8 (N, 32, 32, 3) images; seconds count from here to the
        test accuracy (data transfer, whitening, training, evaluation)."""
        if images.shape[1:] != (32, 32, 3):
            raise ValueError(f"the device loop trains on 32x32 images only, got "
                             f"{images.shape[1]}x{images.shape[2]}: use the fit loop")
        if len(images) != self.num_train:
            raise ValueError(f"this trainer was compiled for {self.num_train} images, "
                             f"got {len(images)}")
        started = time.perf_counter()
        key = jax.random.key(recipe.seed)
        k_init, k_flip, key = jax.random.split(key, 3)
        images_dev = jnp.asarray(images)
        labels_dev = jnp.asarray(labels, jnp.int32)
        params, stats = self._init(
            k_init, jnp.asarray(models.whitening_sample(images, recipe.seed)))
        padded = self._prepare(images_dev, k_flip, translate=recipe.translate, flip=recipe.flip)
        del images_dev

        total = math.ceil(self.batches_per_epoch * recipe.epochs)
        kilostep = 1024 * (1 + 1 / (1 - recipe.momentum))
        hp = {
            "lr": jnp.float32(recipe.lr / kilostep),
            "weight_decay": jnp.float32(recipe.weight_decay * self.batch_size / kilostep),
            "momentum": jnp.float32(recipe.momentum),
            "bias_lr_scale": jnp.float32(recipe.bias_lr_scale),
            "label_smoothing": jnp.float32(recipe.label_smoothing),
            "lookahead_every": jnp.int32(recipe.lookahead_every),
            "lr_factors": jnp.asarray(_padded(lr_factors(total, recipe.lr_start,
                                                         recipe.lr_peak_at, recipe.lr_end))),
            "decays": jnp.asarray(_padded(lookahead_decays(total))),
        }
        momenta = [jnp.zeros_like(p) for p in params]
        copy = functools.partial(jax.tree.map, jnp.copy)  # donated buffers must be distinct
        state = (params, stats, momenta, copy(params), copy(stats), jnp.int32(0))
        history, done = [], 0
        for epoch in range(math.ceil(recipe.epochs)):
            steps = min(self.batches_per_epoch, total - done)
            if steps <= 0:
                break
            key, k_epoch = jax.random.split(key)
            epoch_started = time.perf_counter()
            run_epoch = self._epoch if self.scan else self._epoch_by_step
            state, loss, correct = run_epoch(
                state, padded, labels_dev, hp, k_epoch,
                jnp.bool_(recipe.flip and epoch % 2 == 1),
                jnp.bool_(epoch < recipe.whiten_bias_epochs),
                steps=steps, translate=recipe.translate)
            done += steps
            history.append({"epoch": epoch, "steps": steps, "loss": loss, "correct": correct})
            if on_epoch is not None or time_limit is not None:
                jax.block_until_ready(loss)  # only when someone watches: a sync per epoch
                now = time.perf_counter()
                if on_epoch is not None:
                    on_epoch(epoch, float(loss) / (steps * self.batch_size))
                if time_limit is not None and now + (now - epoch_started) > started + time_limit:
                    break
        params, stats = state[3], state[4]  # the run ends on the lookahead average
        accuracy = plain_accuracy = float("nan")
        if test_images is not None and len(test_images):
            plain, tta = self.predict(params, stats, test_images)
            truth = jnp.asarray(test_labels)
            accuracy = float((tta.argmax(-1) == truth).mean())
            plain_accuracy = float((plain.argmax(-1) == truth).mean())
        else:
            jax.block_until_ready(params)
        seconds = time.perf_counter() - started
        rows = [{"epoch": h["epoch"],
                 "loss": float(h["loss"]) / (h["steps"] * self.batch_size),
                 "accuracy": float(h["correct"]) / (h["steps"] * self.batch_size)}
                for h in history]
        return RunResult(self, [np.asarray(p) for p in params], [np.asarray(s) for s in stats],
                         seconds, accuracy, plain_accuracy, done / self.batches_per_epoch, rows)


_TRAINERS: dict[tuple, DeviceTrainer] = {}


def trainer(preset: str, num_classes: int, batch_size: int, num_train: int,
            precision: str, scan: bool | None = None,
            stats: models.PixelStats = models.CIFAR_STATS) -> DeviceTrainer:
    """A cached DeviceTrainer: compiled functions survive between runs in one process."""
    key = (preset, num_classes, batch_size, num_train, precision, scan, stats)
    if key not in _TRAINERS:
        _TRAINERS[key] = DeviceTrainer(*key)
    return _TRAINERS[key]


def devices() -> str:
    return ", ".join(str(d) for d in jax.devices())


def default_precision() -> str:
    """bfloat16 on accelerators (their matrix units are built for it), float32 on CPUs."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
