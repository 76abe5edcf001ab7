from pathlib import Path

import pytest

from convnet import modeldir


def _version(root, n):
    d = root / str(n)
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"x")
    return d


def test_resolve_highest_version_and_version_folder(tmp_path):
    for n in (1, 2, 10):
        _version(tmp_path / "m", n)
    (tmp_path / "m" / ".staging-abc").mkdir()
    assert modeldir.resolve_version(tmp_path / "m").name == "10"
    assert modeldir.resolve_version(tmp_path / "m" / "2").name == "2"
    assert modeldir.model_name(tmp_path / "m" / "2") == "m"


def test_resolve_errors(tmp_path):
    with pytest.raises(modeldir.ModelDirError, match="does not exist"):
        modeldir.resolve_version(tmp_path / "missing")
    with pytest.raises(modeldir.ModelDirError, match="holds no model"):
        modeldir.resolve_version(tmp_path)


def test_publish_takes_next_version_and_never_touches_older(tmp_path):
    old = _version(tmp_path, 1)
    staged = modeldir.staging_dir(tmp_path)
    (staged / "model.onnx").write_bytes(b"new")
    assert modeldir.publish(tmp_path, staged).name == "2"
    assert (old / "model.onnx").read_bytes() == b"x"
    assert not staged.exists()


def test_atomic_write_leaves_no_temp_files(tmp_path):
    modeldir.write_json_atomic(tmp_path / "a.json", {"k": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_labels_validation(tmp_path):
    (tmp_path / "labels.json").write_text('{"not": "a list"}')
    with pytest.raises(modeldir.ModelDirError, match="list of strings"):
        modeldir.load_labels(tmp_path)


def test_bundled_model_is_complete():
    vdir = modeldir.resolve_version(None)
    assert (vdir / "model.onnx").is_file()
    assert len(modeldir.load_labels(vdir)) == 10
    assert modeldir.load_metrics(vdir)["accuracy"] > 0.5


@pytest.mark.parametrize("name", modeldir.bundled_names())
def test_each_bundled_model_is_complete_and_found_by_name(name, tmp_path, monkeypatch):
    vdir = modeldir.resolve_version(name)
    assert vdir.parent == modeldir.bundled_model_root(name)
    labels = modeldir.load_labels(vdir)
    metrics = modeldir.load_metrics(vdir)
    assert (vdir / "model.onnx").is_file() and metrics["accuracy"] > 1 / len(labels)
    assert modeldir.model_name(vdir) == name
    monkeypatch.chdir(tmp_path)
    (tmp_path / name / "1").mkdir(parents=True)  # a folder of that name here wins over the bundle
    assert modeldir.resolve_version(name) == Path(name) / "1"


def test_an_unknown_name_lists_the_bundled_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(modeldir.ModelDirError, match="does not exist.*cifar10"):
        modeldir.resolve_version("no-such-model")
