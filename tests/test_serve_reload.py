"""Model loading and hot reload: new versions swap in without failing a request; broken ones are
refused with a reason while the old version keeps serving."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
from conftest import TINY_WEIGHTS, build_tiny_onnx, write_version

from convnet.modeldir import ModelDirError
from convnet.serve import create_app, decode
from convnet.serve.holder import ModelHolder
from convnet.serve.model import load_model


def float_input_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 32, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


BROKEN_VERSIONS = {
    # id: (write_version kwargs, words in the reason)
    "garbage onnx": (dict(onnx_bytes=b"not a model"), "ONNX Runtime cannot load model.onnx"),
    "fewer outputs than labels": (dict(weights=np.ones((3, 5), np.float32)), "output shape"),
    "float input": (dict(onnx_bytes=float_input_model()), "expected tensor(uint8)"),
    "labels not strings": (dict(labels=[1, 2, 3]), "labels.json"),
    "metrics not an object": (dict(metrics=[1]), "metrics.json"),
    "config.json disagrees with the graph": (
        dict(size=64, config={"image_size": 32}),
        "config.json says image_size 32, but model.onnx takes 64x64 images"),
    "metrics.json disagrees with the graph": (
        dict(metrics={"image_size": 48}), "metrics.json says image_size 48"),
    "image_size not an integer": (dict(size=64, config={"image_size": "64"}),
                                  "config.json: image_size must be an integer, not '64'"),
    "config not an object": (dict(config=[64]), "config.json must hold a JSON object"),
    "symbolic height and width": (
        dict(onnx_bytes=build_tiny_onnx(TINY_WEIGHTS[1], size="S")),
        "model.onnx takes input shape ['N', 'S', 'S', 3]: its height and width must be fixed"),
    "symbolic width": (dict(onnx_bytes=build_tiny_onnx(TINY_WEIGHTS[1], size=(32, "W"))),
                       "its height and width must be fixed integers"),
    "not square": (dict(onnx_bytes=build_tiny_onnx(TINY_WEIGHTS[1], size=(32, 48))),
                   "model.onnx takes 32x48 images: expected square ones"),
}


@pytest.mark.parametrize("kwargs,words", BROKEN_VERSIONS.values(), ids=BROKEN_VERSIONS.keys())
def test_load_model_refuses_with_a_reason(tmp_path, kwargs, words):
    version_dir = write_version(tmp_path / "m", 1, **kwargs)
    with pytest.raises(ModelDirError, match=re.escape(words)):
        load_model(version_dir)


def test_unreadable_config_is_refused(tmp_path):
    version_dir = write_version(tmp_path / "m", 1)
    (version_dir / "config.json").write_text('{"image_size": ')
    with pytest.raises(ModelDirError, match="config.json is missing or invalid"):
        load_model(version_dir)


@pytest.mark.parametrize("size,config", [(32, None), (32, {"image_size": 32}),
                                         (64, {"image_size": 64}), (96, {"preset": "fast"})])
def test_the_input_size_is_the_graphs(tmp_path, size, config):
    """Recorded or not (the bundled model records none), S is what the graph takes."""
    model = load_model(write_version(tmp_path / "m", 1, size=size, config=config))
    assert model.input_size == size and model.input_shape == (size, size, 3)


def test_load_model_refuses_missing_softmax(tmp_path, monkeypatch):
    version_dir = write_version(tmp_path / "m", 1)
    model = load_model(version_dir)
    monkeypatch.setattr(type(model), "predict", lambda self, pixels: np.full(
        (len(pixels), 10), 2.0, np.float32))
    with pytest.raises(ModelDirError, match="softmax"):
        load_model(version_dir)


def test_a_batch_of_one_graph_is_fed_image_by_image(tmp_path):
    version_dir = write_version(tmp_path / "m", 1, onnx_bytes=build_tiny_onnx(TINY_WEIGHTS[1], 1))
    model = load_model(version_dir)
    assert model.fixed_batch
    pixels = np.zeros((3, 32, 32, 3), np.uint8)
    pixels[1, ..., 0] = 255
    assert model.predict(pixels).argmax(axis=1).tolist()[1] == 0


def test_startup_skips_a_broken_newest_version(fresh_root):
    write_version(fresh_root, 2, onnx_bytes=b"broken")
    holder = ModelHolder(fresh_root, reload_interval=0)
    holder.load_initial()
    assert holder.current.version == 1
    assert "cannot load" in holder.refusals[2].reason


def test_unreadable_labels_are_refused_not_raised(fresh_root):
    version_dir = write_version(fresh_root, 2)
    (version_dir / "labels.json").write_bytes(b"\xff\xfe not utf-8 \xff")
    holder = ModelHolder(fresh_root, reload_interval=0)
    holder.load_initial()
    assert holder.current.version == 1 and 2 in holder.refusals


def test_a_pinned_version_folder_is_never_reloaded(fresh_root):
    holder = ModelHolder(fresh_root / "1", reload_interval=0)
    holder.load_initial()
    write_version(fresh_root, 2)
    holder.poll()
    holder.poll()
    assert holder.current.version == 1 and holder.watched_root is None


def test_refused_version_is_retried_when_its_files_change(fresh_root):
    holder = ModelHolder(fresh_root, reload_interval=0)
    holder.load_initial()
    version_dir = write_version(fresh_root, 2)
    (version_dir / "labels.json").unlink()  # as if copied in without labels yet
    holder.poll()  # first sight: wait for the folder to settle
    assert holder.current.version == 1 and not holder.refusals
    holder.poll()
    assert "labels.json is missing" in holder.refusals[2].reason
    holder.poll()
    assert holder.current.version == 1  # not retried while unchanged
    (version_dir / "labels.json").write_text('["a","b","c","d","e","f","g","h","i","j"]')
    holder.poll()
    holder.poll()
    assert holder.current.version == 2 and not holder.refusals


def test_a_first_version_appearing_later_is_served(tmp_path):
    root = tmp_path / "late"
    app = create_app({"MODEL_DIR": str(root), "RELOAD_INTERVAL": 0})
    client, holder = app.test_client(), app.extensions["convnet.registry"].served.default
    assert client.get("/readyz").status_code == 503
    write_version(root, 1)
    holder.poll()
    holder.poll()
    assert client.get("/readyz").status_code == 200


def wait_for(condition, timeout=10.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def test_hot_swap_under_load_and_broken_version_refused(fresh_root, red_png):
    app = create_app({"MODEL_DIR": str(fresh_root), "RELOAD_INTERVAL": 0.05})
    holder = app.extensions["convnet.registry"].served.default
    answers: list[tuple[int, int | None, str | None]] = []  # (status, version, label)
    stop = threading.Event()

    def hammer():
        client = app.test_client()
        while not stop.is_set():
            response = client.post("/api/v1/predict", data=red_png, content_type="image/png")
            body = response.get_json()
            answers.append((response.status_code, body.get("version"),
                            body.get("predictions", [{}])[0].get("label")))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: len(answers) > 20)
        write_version(fresh_root, 2, weights=TINY_WEIGHTS[2], metrics={"accuracy": 0.9})
        assert wait_for(lambda: answers[-1][1] == 2), "version 2 was never served"
        (fresh_root / ".staging-abandoned").mkdir()  # hidden folders are never versions
        write_version(fresh_root, 3, onnx_bytes=build_tiny_onnx(TINY_WEIGHTS[1])[:100])
        assert wait_for(lambda: 3 in holder.refusals), "version 3 was never refused"
        served_after_refusal = len(answers)
        assert wait_for(lambda: len(answers) > served_after_refusal + 20)
    finally:
        stop.set()
        for t in threads:
            t.join()
        holder.stop()

    assert {status for status, _, _ in answers} == {200}, "a request failed during a swap"
    # Each version answers with its own weights: red is airplane in v1, bird in v2.
    assert {(v, label) for _, v, label in answers} == {(1, "airplane"), (2, "bird")}
    assert answers[-1][1] == 2
    client = app.test_client()
    readyz = client.get("/readyz").get_json()
    assert readyz["ready"] and readyz["model"]["version"] == 2
    (refusal,) = readyz["refused"]
    assert refusal == {"version": 3, "reason": "ONNX Runtime cannot load model.onnx",
                       "at": refusal["at"]}
    assert client.get("/").status_code == 200 and "90.0%" in client.get("/").text
    metrics = client.get("/metrics").text
    assert 'convnet_model_loads_total{result="refused"} 1.0' in metrics
    assert "convnet_model_refused_version 3.0" in metrics
    status = client.get("/v1/models/cifar10").get_json()["model_version_status"]
    assert [(s["version"], s["state"]) for s in status] == [("2", "AVAILABLE"), ("3", "END")]


def test_hot_reload_to_a_model_of_another_size(fresh_root, red_png):
    """32 px version 1 -> 64 px version 2: every door follows the new size; a version whose
    config.json contradicts its graph is refused after it, and version 2 keeps serving."""
    app = create_app({"MODEL_DIR": str(fresh_root), "RELOAD_INTERVAL": 0})
    client, holder = app.test_client(), app.extensions["convnet.registry"].served.default

    def served_shape():
        return client.get("/v2/models/cifar10").get_json()["inputs"][0]["shape"]

    def predict_pixels(size):
        blue = np.zeros((size, size, 3), np.uint8)
        blue[..., 2] = 255
        return client.post("/v1/models/cifar10:predict", json={"instances": [blue.tolist()]})

    assert served_shape() == [-1, 32, 32, 3] and predict_pixels(32).status_code == 200
    write_version(fresh_root, 2, weights=TINY_WEIGHTS[2], size=64)
    holder.poll()
    holder.poll()
    assert holder.current.version == 2 and holder.current.input_size == 64
    assert served_shape() == [-1, 64, 64, 3]
    assert predict_pixels(32).status_code == 400
    assert np.argmax(predict_pixels(64).get_json()["predictions"]) == 1  # v2: blue -> automobile
    answer = client.post("/api/v1/predict", data=red_png, content_type="image/png").get_json()
    assert (answer["version"], answer["predictions"][0]["label"]) == (2, "bird")
    assert "64&times;64 RGB pixels" in client.get("/").text
    assert client.get("/openapi.json").get_json()["components"]["schemas"]["Pixels"][
        "maxItems"] == 64

    write_version(fresh_root, 3, size=64, config={"image_size": 32})
    holder.poll()
    holder.poll()
    assert holder.current.version == 2
    (refusal,) = client.get("/readyz").get_json()["refused"]
    assert (refusal["version"], refusal["reason"]) == (
        3, "config.json says image_size 32, but model.onnx takes 64x64 images")


def test_a_request_decodes_at_the_size_of_the_model_it_holds(fresh_root, red_png, monkeypatch):
    """The swap to a 64 px version happens while a request that picked up the 32 px version is
    decoding: that request decodes at 32 and is answered by version 1; the next one, at 64, by
    version 2."""
    app = create_app({"MODEL_DIR": str(fresh_root), "RELOAD_INTERVAL": 0})
    client, holder = app.test_client(), app.extensions["convnet.registry"].served.default
    write_version(fresh_root, 2, weights=TINY_WEIGHTS[2], size=64)
    holder.poll()  # first sight of version 2; the next poll loads it
    sizes = []
    real = decode.decode_image

    def swap_then_decode(data, **kwargs):
        sizes.append(kwargs["size"])
        if holder.current.version == 1:
            holder.poll()
        return real(data, **kwargs)

    monkeypatch.setattr(decode, "decode_image", swap_then_decode)
    answers = [client.post("/api/v1/predict", data=red_png, content_type="image/png")
               for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert [(a.get_json()["version"], a.get_json()["predictions"][0]["label"])
            for a in answers] == [(1, "airplane"), (2, "bird")]
    assert sizes == [32, 64]
