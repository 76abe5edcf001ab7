"""What training prints (convnet.train.progress): a bar on a terminal, one line per epoch
anywhere else."""

import io

import pytest

pytest.importorskip("keras")
from convnet.train.progress import EpochProgress  # noqa: E402


class Terminal(io.StringIO):
    def isatty(self):
        return True


def drive(stream, epochs=2, steps=3) -> str:
    """Feed the callback what model.fit would, with no model behind it."""
    progress = EpochProgress(epochs, steps, stream=stream)
    progress.on_train_begin()
    for epoch in range(epochs):
        progress.on_epoch_begin(epoch)
        for step in range(steps):
            progress.on_train_batch_end(step, {"loss": 1.0 / (step + 1), "accuracy": 0.5})
        progress.on_epoch_end(epoch, {"loss": 0.5, "accuracy": 0.75, "val_accuracy": 0.7})
    progress.on_train_end()
    return stream.getvalue()


def test_not_a_terminal_gets_one_plain_line_per_epoch():
    lines = drive(io.StringIO()).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1/2  loss 0.5000  accuracy 0.7500  val_accuracy 0.7000")
    assert lines[1].startswith("epoch 2/2")


def test_a_terminal_gets_a_bar_and_keeps_the_epoch_lines():
    shown = drive(Terminal())
    assert "\r" in shown and "0/3" in shown  # tqdm drew its bar, and redraws it in place
    assert shown.count("epoch 1/2  loss 0.5000") == 1 and "val_accuracy 0.7000" in shown
