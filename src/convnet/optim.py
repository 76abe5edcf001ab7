"""The optimiser and learning-rate schedule of the airbench recipe, as Keras objects.

Both are registered as Keras serialisables, so a checkpoint (`model.keras` with its optimizer)
restores them by name once this module is imported.
"""

from __future__ import annotations

import keras
import numpy as np


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


@keras.saving.register_keras_serializable(package="convnet")
class AirbenchSGD(keras.optimizers.SGD):
    """Nesterov SGD with coupled L2 decay and a faster learning rate for BatchNorm biases.

    The whitening stem's kernel never moves; its bias learns while `whiten_bias_on` is 1
    (train.WhitenBiasEpochs turns it off after a few epochs)."""

    def __init__(self, l2: float = 0.0, bias_lr_scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.l2, self.bias_lr_scale = float(l2), float(bias_lr_scale)
        # A switch, not optimizer state: not saved; WhitenBiasEpochs sets it every epoch.
        self.whiten_bias_on = keras.Variable(1.0, trainable=False, name="whiten_bias_on")

    def update_step(self, gradient, variable, learning_rate):
        path = getattr(variable, "path", "")
        if path.startswith("whiten/"):
            if not path.endswith("bias"):
                return
            on = keras.ops.cast(self.whiten_bias_on, gradient.dtype)
            gradient, learning_rate = gradient * on, learning_rate * on
        scale = self.bias_lr_scale if variable.name == "beta" else 1.0
        # Same absolute decay for every variable: the L2 term is divided by the lr scale.
        gradient = gradient + (self.l2 / scale) * variable
        super().update_step(gradient, variable, learning_rate * scale)

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
