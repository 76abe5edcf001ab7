"""The optimiser and learning-rate schedule of the airbench recipe, as Keras objects.

Both are registered as Keras serialisables, so a checkpoint (`model.keras` with its optimizer)
restores them by name once this module is imported.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="convnet")
class TriangularSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """0.2 * peak -> peak over `warmup` of the steps, then linearly down to 0."""

    def __init__(self, peak: float, total_steps: int, warmup: float = 0.2):
        self.peak, self.total_steps, self.warmup = float(peak), int(total_steps), float(warmup)

    def __call__(self, step):
        t = keras.ops.cast(step, "float32") / max(self.total_steps, 1)
        up = 0.2 + 0.8 * t / self.warmup
        down = (1.0 - t) / (1.0 - self.warmup)
        return self.peak * keras.ops.clip(keras.ops.minimum(up, down), 0.0, 1.0)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup": self.warmup}


@keras.saving.register_keras_serializable(package="convnet")
class AirbenchSGD(keras.optimizers.SGD):
    """Nesterov SGD with coupled L2 decay and a faster learning rate for BatchNorm biases."""

    def __init__(self, l2: float = 0.0, bias_lr_scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.l2, self.bias_lr_scale = float(l2), float(bias_lr_scale)

    def update_step(self, gradient, variable, learning_rate):
        scale = self.bias_lr_scale if variable.name == "beta" else 1.0
        # Same absolute decay for every variable: the L2 term is divided by the lr scale.
        gradient = gradient + (self.l2 / scale) * variable
        super().update_step(gradient, variable, learning_rate * scale)

    def get_config(self):
        return {**super().get_config(), "l2": self.l2, "bias_lr_scale": self.bias_lr_scale}
