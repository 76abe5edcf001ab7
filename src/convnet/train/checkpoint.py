"""The training checkpoint: all that `--resume` needs, written so that a kill at any moment
leaves one whole checkpoint, the previous or the new.

    OUT/.checkpoint/<n>/      the highest n is the checkpoint (n counts saves, across runs)
        model.keras           weights and optimizer state (momenta, step count)
        lookahead.npz         the lookahead average, arr_0.. in model.weights order (airbench
                              presets on TensorFlow only)
        state.json            {"epochs_done", "config", "history"}; history is the per-epoch log

A save fills a hidden `.staging-*` folder and renames it to <n+1>: that rename is the commit, so
the three files always belong together. Older folders and leftovers from a killed save are
removed afterwards. A folder named by an integer only ever appears complete, so loading takes the
highest one and never looks inside the others.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from convnet import modeldir
from convnet.train import multihost
from convnet.train.config import TrainConfig, TrainError

CHECKPOINT_DIR = ".checkpoint"  # inside the model root; hidden from version listing
MODEL_FILE = "model.keras"
LOOKAHEAD_FILE = "lookahead.npz"
STATE_FILE = "state.json"


@dataclass
class Checkpoint:
    path: Path  # the <n> folder
    epochs_done: int
    config: dict
    history: list[dict] = field(default_factory=list)  # one row per epoch: epoch, loss, ...
    lookahead: list[np.ndarray] | None = None


def _numbered(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found, key=lambda p: int(p.name))


def save(directory: Path, model: keras.Model, *, epochs_done: int, cfg: TrainConfig,
         history: list[dict], lookahead: list[np.ndarray] | None = None) -> Path:
    """Write a checkpoint after `epochs_done` epochs and make it the current one."""
    directory.mkdir(parents=True, exist_ok=True)
    older = _numbered(directory)
    staged = Path(tempfile.mkdtemp(dir=directory, prefix=".staging-"))
    model.save(staged / MODEL_FILE)
    if lookahead is not None:
        np.savez(staged / LOOKAHEAD_FILE, *lookahead)
    state = {"epochs_done": epochs_done, "config": asdict(cfg), "history": history}
    modeldir.write_json_atomic(staged / STATE_FILE, state)
    target = directory / str(int(older[-1].name) + 1 if older else 1)
    os.rename(staged, target)
    # No try/finally around the steps above: a kill runs no cleanup either, and whatever it
    # leaves is swept here by the next save.
    for leftover in directory.iterdir():
        if leftover == target:
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    return target


def load(directory: Path) -> Checkpoint:
    """The current checkpoint in `directory`; TrainError if there is none."""
    numbered = _numbered(directory)
    if not numbered:
        raise TrainError(f"--resume: no checkpoint in {directory}")
    path = numbered[-1]
    state = json.loads((path / STATE_FILE).read_text())
    lookahead = None
    if (path / LOOKAHEAD_FILE).is_file():
        with np.load(path / LOOKAHEAD_FILE) as arrays:
            lookahead = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    return Checkpoint(path, state["epochs_done"], state["config"], state["history"], lookahead)


def restore(model: keras.Model, checkpoint: Checkpoint) -> None:
    """Load the checkpoint's weights and optimizer state into a model built and compiled as the
    checkpointed run built it (train.recipe.build_model). Keras only warns when the optimizer's
    variables do not match and then leaves them fresh; here that is an error."""
    model.optimizer.build(model.trainable_variables)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "Skipping variable loading", UserWarning)
        try:
            model.load_weights(checkpoint.path / MODEL_FILE)
        except (ValueError, Warning) as exc:
            raise TrainError(f"--resume: {checkpoint.path} does not fit this run's model "
                             f"(was it trained with other options?): {exc}") from None


class SaveEveryEpoch(keras.callbacks.Callback):
    """After every epoch: model, optimizer, lookahead average and the log so far, as one
    checkpoint. `history` holds the rows of the epochs before this run (a resumed run's).
    `write` False keeps the log but writes nothing (the processes of multi-host training but
    the first)."""

    def __init__(self, directory: Path, cfg: TrainConfig, history: Sequence[dict] = (),
                 lookahead=None, write: bool = True):
        super().__init__()
        self.directory, self.cfg, self.write = directory, cfg, write
        self.history = list(history)
        self.lookahead = lookahead  # a recipe.Lookahead callback, or None

    def on_epoch_end(self, epoch, logs=None):
        self.history.append({"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}})
        if not self.write:
            return
        average = self.lookahead.average if self.lookahead is not None else None
        with multihost.saving_alone():
            save(self.directory, self.model, epochs_done=epoch + 1, cfg=self.cfg,
                 history=self.history, lookahead=average)
