"""The optimiser and learning-rate schedule of the airbench recipe, as Keras objects.

Both are registered as Keras serialisables, so a checkpoint (`model.keras` with its optimizer)
restores them by name once this module is imported.
"""

from __future__ import annotations

import re

import keras
import numpy as np

WHITEN_BIAS_EPOCHS = 3  # the whitening stem's bias trains this many epochs, then freezes
LOOKAHEAD_EVERY = 5  # steps between pulls towards the lookahead average


@keras.saving.register_keras_serializable(package="convnet")
class TriangularSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """start * peak -> peak at `warmup` of the steps, then linearly down to end * peak."""

    def __init__(self, peak: float, total_steps: int, warmup: float = 0.23, start: float = 0.2,
                 end: float = 0.07):
        self.peak, self.total_steps, self.warmup = float(peak), int(total_steps), float(warmup)
        self.start, self.end = float(start), float(end)

    def __call__(self, step):
        t = keras.ops.cast(step, "float32") / max(self.total_steps, 1)
        up = self.start + (1 - self.start) * t / self.warmup
        down = 1 - (1 - self.end) * (t - self.warmup) / (1 - self.warmup)
        factor = keras.ops.where(t < self.warmup, up, down)
        return self.peak * keras.ops.clip(factor, min(self.start, self.end), 1.0)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup": self.warmup,
                "start": self.start, "end": self.end}


def variable_path(variable) -> tuple[str, str]:
    """(layer, variable) names of a variable handed to an optimizer's update_step. JAX hands
    over the Keras variable ("group1_bn0/beta"); TensorFlow hands over its own, named
    "group1_bn0/beta:0" (and "group1_bn0/beta/replica_1:0" on a second mirrored device)."""
    path = getattr(variable, "path", None) or re.sub(r"(/replica_\d+)?:\d+$", "", variable.name)
    layer, _, name = path.rpartition("/")
    return layer.rpartition("/")[2], name


@keras.saving.register_keras_serializable(package="convnet")
class AirbenchSGD(keras.optimizers.SGD):
    """Nesterov SGD with coupled L2 decay and a faster learning rate for BatchNorm biases.

    The momentum buffer holds gradients and the learning rate applies at the update, as in
    PyTorch and the device loop (Keras's SGD keeps lr-scaled steps instead, which differs
    whenever the schedule moves). The whitening stem's kernel never moves; its bias learns
    while the stem is trainable (train.WhitenBiasEpochs freezes it after a few epochs)."""

    def __init__(self, l2: float = 0.0, bias_lr_scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not self.momentum:
            raise ValueError("AirbenchSGD needs a momentum above 0")
        self.l2, self.bias_lr_scale = float(l2), float(bias_lr_scale)

    def update_step(self, gradient, variable, learning_rate):
        ops = keras.ops
        layer, name = variable_path(variable)
        if layer == "whiten" and name != "bias":
            return
        scale = self.bias_lr_scale if name == "beta" else 1.0
        gradient = ops.cast(gradient, variable.dtype)
        learning_rate = ops.cast(learning_rate, variable.dtype) * scale
        # Same absolute decay for every variable: the L2 term is divided by the lr scale.
        gradient = gradient + (self.l2 / scale) * variable
        m = self.momentums[self._get_variable_index(variable)]
        new_m = self.momentum * m + gradient
        self.assign(m, new_m)
        self.assign(variable, variable - learning_rate * (gradient + self.momentum * new_m))

    def get_config(self):
        return {**super().get_config(), "l2": self.l2, "bias_lr_scale": self.bias_lr_scale}


def lr_factors(total_steps: int, start: float, peak_at: float, end: float) -> np.ndarray:
    """Learning-rate multiplier for steps 0..total: start -> 1 at peak_at, then -> end (the
    device loop's form of TriangularSchedule, peaking on a whole step)."""
    peak = int(peak_at * total_steps)
    x = np.arange(total_steps + 1)
    return np.interp(x, [0, peak, total_steps], [start, 1.0, end]).astype("float32")


def lookahead_decays(total_steps: int) -> np.ndarray:
    """airbench's lookahead: after step i the average keeps decays[i] of itself."""
    return (0.95**5 * (np.arange(total_steps + 1) / total_steps) ** 3).astype("float32")
