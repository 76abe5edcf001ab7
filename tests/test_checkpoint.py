"""The training checkpoint (convnet.train.checkpoint): a kill at any point of a save leaves one
whole checkpoint whose parts agree, and a checkpoint that does not fit the model is refused."""

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from convnet.train import TrainConfig, TrainError, checkpoint  # noqa: E402
from convnet.train.recipe import build_model  # noqa: E402


class Killed(BaseException):
    """Stands for SIGKILL: save() has no except or finally, so nothing runs after it."""


def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def set_epoch(model, epoch: int) -> None:
    """Every weight and every optimizer slot holds `epoch`, so a file shows where it came from."""
    for v in [*model.weights, *model.optimizer.variables]:
        v.assign(np.full(v.shape, epoch, v.dtype))


def save(directory, model, epoch: int):
    set_epoch(model, epoch)
    return checkpoint.save(directory, model, epochs_done=epoch, cfg=TrainConfig(),
                           history=[{"epoch": e, "loss": 1.0 / (e + 1)} for e in range(epoch)],
                           lookahead=[np.full(w.shape, epoch, "float32") for w in model.weights])


def assert_whole(directory, epoch: int) -> None:
    """The current checkpoint is the one saved after `epoch`, all three parts of it."""
    current = checkpoint.load(directory)
    assert current.epochs_done == epoch and len(current.history) == epoch
    restored = tiny_model()
    checkpoint.restore(restored, current)
    for v in [*restored.weights, *restored.optimizer.variables]:
        np.testing.assert_array_equal(np.asarray(v), epoch, err_msg=v.path)
    assert all((a == epoch).all() for a in current.lookahead)


def kill_while_writing_the_model(monkeypatch, model):
    def half_then_die(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise Killed

    monkeypatch.setattr(model, "save", half_then_die)


def kill_before_the_state(monkeypatch, model):
    def die(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(checkpoint.modeldir, "write_json_atomic", die)


def kill_before_the_rename(monkeypatch, model):
    real = checkpoint.os.rename

    def die_on_commit(src, dst, *args, **kwargs):
        if ".staging-" in str(src):
            raise Killed
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "rename", die_on_commit)


def kill_before_removing_the_old(monkeypatch, model):
    real = checkpoint.shutil.rmtree

    def die_on_cleanup(path, *args, **kwargs):
        if Path(path).name.isdigit():  # Keras's own temporary folders go on as usual
            raise Killed
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", die_on_cleanup)


@pytest.mark.parametrize(("kill", "survivor"), [
    (kill_while_writing_the_model, 1),
    (kill_before_the_state, 1),
    (kill_before_the_rename, 1),
    (kill_before_removing_the_old, 2),
])
def test_a_kill_at_any_point_leaves_one_whole_checkpoint(tmp_path, monkeypatch, kill, survivor):
    model = tiny_model()
    save(tmp_path, model, 1)
    with monkeypatch.context() as patch:
        kill(patch, model)
        with pytest.raises(Killed):
            save(tmp_path, model, 2)
    assert_whole(tmp_path, survivor)
    # the next save succeeds and sweeps what the killed one left behind
    current = save(tmp_path, model, 3)
    assert [p.name for p in tmp_path.iterdir()] == [current.name]
    assert_whole(tmp_path, 3)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TrainError, match="no checkpoint"):
        checkpoint.load(tmp_path / ".checkpoint")


def test_a_checkpoint_whose_optimizer_does_not_fit_is_refused(tmp_path):
    # Keras would only warn and leave the optimizer fresh; a resumed run must not do that.
    cfg = TrainConfig(preset="quick", batch_size=32)
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    saved = build_model(cfg, images, 3, steps=10)
    saved.get_layer("whiten").trainable = False  # one variable fewer for the optimizer
    saved.optimizer.build(saved.trainable_variables)
    checkpoint.save(tmp_path, saved, epochs_done=1, cfg=cfg, history=[])
    with pytest.raises(TrainError, match="does not fit"):
        checkpoint.restore(build_model(cfg, images, 3, steps=10), checkpoint.load(tmp_path))
