"""The airbench recipe for model.fit: initialisation, whitening, optimiser, and the two callbacks
that change weights between steps (lookahead averaging, freezing the stem)."""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from convnet import models
from convnet.optim import (
    LOOKAHEAD_EVERY,
    WHITEN_BIAS_EPOCHS,
    AirbenchMuon,
    AirbenchSGD,
    TriangularSchedule,
    lookahead_decays,
)
from convnet.train.config import MUON, TUTORIAL_LR, TrainConfig, TrainError


def init_whitening(model: keras.Model, images: np.ndarray, seed: int,
                   stats: models.PixelStats) -> None:
    """Set the patch stem from a random 5,000 of the images (models.whitening_kernel), as
    normalised by `stats`; bias 0."""
    layer = model.get_layer("whiten")
    kernel = models.whitening_kernel(models.whitening_sample(images, seed),
                                     layer.kernel_size[0], layer.filters, stats)
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


def muon_optimizer(model: keras.Model, batch_size: int, steps: int,
                   whiten_bias_steps: int = 0) -> AirbenchMuon:
    """airbench94_muon's optimiser and schedule (linear from the peak down to 0, no warm-up)
    with its SGD learning rates and decay converted from its units (summed loss; a head of
    unit-variance weights divided by its width) to this model's (mean loss; the head's
    Rescaling of spec.logit_scale). Muon's own step needs no conversion."""
    width = model.get_layer("head").input.shape[-1]
    scale = float(model.get_layer("logits").scale)
    return AirbenchMuon(
        learning_rate=TriangularSchedule(1.0, steps, warmup=0.0, start=1.0, end=0.0),
        muon_lr=MUON["muon_lr"], muon_momentum=MUON["muon_momentum"],
        bias_lr=MUON["bias_lr"] * batch_size,
        head_lr=MUON["head_lr"] * batch_size / (width * scale) ** 2,
        momentum=MUON["momentum"], decay=MUON["decay_per_example"] * batch_size,
        whiten_bias_steps=whiten_bias_steps)


def compile_model(model: keras.Model, cfg: TrainConfig, steps: int,
                  steps_per_epoch: int | None = None) -> None:
    """Compile for `steps` steps in all; `steps_per_epoch` times the stem bias's decay under
    Muon (None: it follows the main schedule until WhitenBiasEpochs freezes it)."""
    if not cfg.batch_size:
        raise ValueError("compile_model needs cfg.batch_size (train() sets the preset's default)")
    if cfg.preset == "tutorial":
        optimizer = keras.optimizers.Adam(TUTORIAL_LR)
    elif cfg.optimizer == "muon":
        optimizer = muon_optimizer(model, cfg.batch_size, steps,
                                   whiten_bias_steps=(steps_per_epoch or 0) * WHITEN_BIAS_EPOCHS)
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


def build_model(cfg: TrainConfig, images: np.ndarray, num_classes: int, steps: int,
                stats: models.PixelStats | None = None, *,
                steps_per_epoch: int | None = None) -> keras.Model:
    """A compiled model as a fresh run starts it, for the images' size and normalised by
    `stats` (default: the images' own). A resumed run builds the same one and loads the
    checkpoint into it, so its optimizer has the variables the checkpoint was saved with.
    With cfg.progressive its input takes any size (as_float32 fixes it for export); the stem
    is set from the full-size images either way."""
    stats = stats or models.pixel_stats(images)
    with dtype_policy("mixed_bfloat16" if cfg.precision == "bfloat16" else "float32"):
        model = models.build(cfg.preset, num_classes, image_size=images.shape[1], stats=stats,
                             any_size=cfg.progressive is not None)
    if cfg.preset != "tutorial":
        init_airbench(model, cfg.seed)
        init_whitening(model, images, cfg.seed, stats)
        model.get_layer("whiten").trainable = True  # the bias; AirbenchSGD holds the kernel
    compile_model(model, cfg, steps, steps_per_epoch)
    return model


def as_float32(model: keras.Model, preset: str, image_size: int | None = None) -> keras.Model:
    """The same weights in a float32 model taking image_size x image_size pixels (default:
    the model's own size): what is saved and exported, whatever trained (bfloat16, or a model
    of any input size, as progressive resizing trains)."""
    size = image_size or models.input_size(model)
    if model.dtype_policy.name == "float32" and model.input.shape[1:3] == (size, size):
        return model
    clone = models.build(preset, model.output.shape[-1], image_size=size,
                         stats=models.normalisation(model))
    values = {v.path: v.numpy() for v in model.variables}
    for variable in clone.variables:
        variable.assign(values[variable.path].astype(variable.dtype))
    return clone


class Lookahead(keras.callbacks.Callback):
    """Every `every` steps, pull an average of the weights (BatchNorm statistics included)
    towards them with a weight that grows as the cube of progress, and restart from the
    average; training ends on it. airbench's "lookahead". `average` continues a resumed run's
    average (checkpointed with the model); None starts it from the weights."""

    def __init__(self, total_steps: int, steps_per_epoch: int, every: int = LOOKAHEAD_EVERY,
                 average: list[np.ndarray] | None = None):
        super().__init__()
        self.per_epoch, self.every = steps_per_epoch, every
        self.decays = lookahead_decays(total_steps)
        self.step = None
        self.average = average

    def on_train_begin(self, logs=None):
        self.variables = [v for v in self.model.weights if "float" in str(v.dtype)]
        if self.average is None:
            self.average = [np.array(v.numpy(), "float32") for v in self.variables]
        shapes = [tuple(v.shape) for v in self.variables]
        if [a.shape for a in self.average] != shapes:
            raise TrainError("the checkpoint's lookahead average does not fit this model")

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
