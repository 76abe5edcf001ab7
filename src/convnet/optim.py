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
        up = self.start + (1 - self.start) * t / max(self.warmup, 1e-9)
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


def nesterov_step(optimizer, variable, momentum_buffer, gradient, learning_rate, momentum):
    """One Nesterov SGD step as PyTorch takes it: the buffer holds gradients, the learning rate
    applies at the update."""
    new_m = momentum * momentum_buffer + gradient
    optimizer.assign(momentum_buffer, new_m)
    optimizer.assign(variable, variable - learning_rate * (gradient + momentum * new_m))


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
        nesterov_step(self, variable, self.momentums[self._get_variable_index(variable)],
                      gradient + (self.l2 / scale) * variable, learning_rate, self.momentum)

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


# Muon's quintic Newton-Schulz coefficients (Jordan et al., 2024): each step pushes every
# singular value of X towards 1 quickly, without converging exactly (they end in about
# 0.7..1.2), which is all an update direction needs.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalise(matrix, steps: int = 3):
    """An approximately semi-orthogonal matrix with `matrix`'s singular vectors (its polar
    factor U V^T), by `steps` quintic Newton-Schulz iterations on the smaller Gram matrix."""
    ops = keras.ops
    a, b, c = NEWTON_SCHULZ
    x = matrix / (ops.sqrt(ops.sum(ops.square(matrix))) + 1e-7)
    tall = matrix.shape[0] > matrix.shape[1]
    if tall:
        x = ops.transpose(x)
    for _ in range(steps):
        gram = ops.matmul(x, ops.transpose(x))
        x = a * x + ops.matmul(b * gram + c * ops.matmul(gram, gram), x)
    return ops.transpose(x) if tall else x


@keras.saving.register_keras_serializable(package="convnet")
class AirbenchMuon(keras.optimizers.Optimizer):
    """airbench94_muon's optimiser as one Keras optimizer: conv kernels by Muon, everything
    else (BatchNorm biases, the stem's bias, the head) by Nesterov SGD with coupled decay.

    Conv kernels: Nesterov momentum of the raw gradient, the kernel rescaled to a Frobenius
    norm of sqrt(output channels) (BatchNorm follows every conv, so only its direction
    matters), then a step of `muon_lr` along the orthogonalised update, seen as a
    (kh * kw * c_in, c_out) matrix. Muon's step length does not depend on the gradient's scale.

    SGD variables: learning rates and decay are in the Keras model's own units (mean loss,
    its head as built): `recipe.muon_optimizer` converts airbench's. `learning_rate` is the
    schedule's factor, 1 at the peak, multiplying both kinds; the stem's bias instead goes from
    bias_lr down to 0 over its `whiten_bias_steps` (then train.WhitenBiasEpochs freezes it)."""

    def __init__(self, muon_lr: float = 0.24, muon_momentum: float = 0.6,
                 bias_lr: float = 0.053, head_lr: float = 0.67, momentum: float = 0.85,
                 decay: float = 0.0, whiten_bias_steps: int = 0, learning_rate=1.0,
                 name: str = "airbench_muon", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.muon_lr, self.muon_momentum = float(muon_lr), float(muon_momentum)
        self.bias_lr, self.head_lr = float(bias_lr), float(head_lr)
        self.momentum, self.decay = float(momentum), float(decay)
        self.whiten_bias_steps = int(whiten_bias_steps)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = [self.add_variable_from_reference(v, "momentum") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        ops = keras.ops
        layer, name = variable_path(variable)
        if layer == "whiten" and name != "bias":
            return
        gradient = ops.cast(gradient, variable.dtype)
        factor = ops.cast(learning_rate, variable.dtype)
        m = self.momentums[self._get_variable_index(variable)]
        # A conv kernel; the stem's is frozen, so it never comes here.
        if name == "kernel" and len(variable.shape) == 4:
            new_m = self.muon_momentum * m + gradient
            self.assign(m, new_m)
            direction = gradient + self.muon_momentum * new_m
            shape = tuple(variable.shape)
            update = orthogonalise(ops.reshape(direction, (-1, shape[-1])))
            norm = ops.sqrt(ops.sum(ops.square(variable)))
            kernel = variable * (float(np.sqrt(shape[-1])) / (norm + 1e-12))
            self.assign(variable, kernel - factor * self.muon_lr * ops.reshape(update, shape))
            return
        lr = self.head_lr if name == "kernel" else self.bias_lr
        if layer == "whiten" and self.whiten_bias_steps:
            # the stem's bias: from bias_lr linearly down to 0 at its last step
            done = ops.cast(self.iterations, variable.dtype) / self.whiten_bias_steps
            factor = ops.maximum(1.0 - done, 0.0)
        # Coupled decay: the same shrink per step (decay x schedule) for every variable.
        nesterov_step(self, variable, m, gradient + (self.decay / lr) * variable, factor * lr,
                      self.momentum)

    def get_config(self):
        return {**super().get_config(), "muon_lr": self.muon_lr,
                "muon_momentum": self.muon_momentum, "bias_lr": self.bias_lr,
                "head_lr": self.head_lr, "momentum": self.momentum, "decay": self.decay,
                "whiten_bias_steps": self.whiten_bias_steps}
