"""What training prints: a tqdm bar per epoch on a terminal, one plain line per epoch anywhere
else (a log file, CI, nohup), where a redrawn bar would be a line per step of escape codes."""

from __future__ import annotations

import sys
import time

import keras
from tqdm import tqdm


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def epoch_line(epoch: int, epochs: int, logs: dict, seconds: float) -> str:
    """`epoch 3/8  loss 1.2345  accuracy 0.5678  val_loss ...  12.3 s` (epoch counted from 0)."""
    metrics = "  ".join(f"{name} {float(value):.4f}" for name, value in logs.items())
    return f"epoch {epoch + 1}/{epochs}  {metrics}  {seconds:.1f} s"


class EpochProgress(keras.callbacks.Callback):
    """Progress of model.fit on `stream` (stdout by default); `bar` None: a bar only if the
    stream is a terminal."""

    def __init__(self, epochs: int, steps_per_epoch: int, stream=None, bar: bool | None = None):
        super().__init__()
        self.epochs, self.steps = epochs, steps_per_epoch
        self.stream = stream or sys.stdout
        self.bar_on = is_terminal(self.stream) if bar is None else bar
        self.bar = None

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()
        if self.bar_on:
            self.bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.epochs}",
                            unit="step", file=self.stream, leave=False, dynamic_ncols=True)

    def on_train_batch_end(self, batch, logs=None):
        if self.bar is not None:
            self.bar.set_postfix({k: f"{float(v):.4f}" for k, v in (logs or {}).items()},
                                 refresh=False)
            self.bar.update(1)

    def on_epoch_end(self, epoch, logs=None):
        line = epoch_line(epoch, self.epochs, logs or {}, time.perf_counter() - self.started)
        if self.bar is not None:
            # the summary line, with the validation metrics, takes the bar's place
            self.bar.close()
            self.bar = None
        print(line, file=self.stream, flush=True)

    def on_train_end(self, logs=None):
        if self.bar is not None:
            self.bar.close()
