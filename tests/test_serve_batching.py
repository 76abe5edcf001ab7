"""MicroBatcher: concurrent submits share inference calls, each caller gets its own rows back,
a lone request is not held back, errors reach the right caller, and close() is clean.

These tests check behaviour (who got what, how many calls, batch sizes), not speed: timings only
appear as generous upper bounds (seconds where milliseconds are expected).
"""

from __future__ import annotations

import base64
import contextlib
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from convnet.serve.batching import MicroBatcher, ModelBatchers

LONG_DELAY = 5.0  # seconds: a max_delay no test may ever wait out


class RecordingModel:
    """infer(): row i -> [pixels[i, 0, 0, 0], pixels[i, 0, 0, 1]] as float, recording batch sizes.
    While `gate` is clear, calls block: lets a test pile requests up behind a busy worker."""

    def __init__(self, poison: int | None = None):
        self.sizes: list[int] = []
        self.threads: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.poison = poison  # a request id whose images make the model raise

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.sizes.append(len(pixels))
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.gate.wait(10)
        if self.poison is not None and np.any(pixels[:, 0, 0, 0] == self.poison):
            raise ValueError(f"poisoned input {self.poison}")
        return pixels[:, 0, 0, :2].astype(np.float32)


def tagged(request_id: int, count: int) -> np.ndarray:
    """(count, 32, 32, 3) uint8 whose row r carries (request_id, r) in its first pixel."""
    pixels = np.zeros((count, 32, 32, 3), np.uint8)
    pixels[:, 0, 0, 0] = request_id
    pixels[:, 0, 0, 1] = np.arange(count)
    return pixels


def expected_rows(request_id: int, count: int) -> list[list[float]]:
    return [[float(request_id), float(r)] for r in range(count)]


def wait_until(condition, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def queued(batcher: MicroBatcher) -> int:
    return batcher._queued_images


def wait_for_pile_up(batcher: MicroBatcher, model: RecordingModel, total: int) -> None:
    """Wait until the worker is stuck in its first call and every other image is queued."""
    wait_until(lambda: model.entered.is_set() and queued(batcher) == total - model.sizes[0])


@contextlib.contextmanager
def worker_held(model: RecordingModel):
    """Calls block inside the block (the worker is "busy"), and are always released after."""
    model.gate.clear()
    try:
        yield
    finally:
        model.gate.set()


@pytest.fixture
def model():
    return RecordingModel()


@pytest.fixture
def make_batcher():
    batchers = []

    def make(infer, **kwargs) -> MicroBatcher:
        batchers.append(MicroBatcher(infer, **kwargs))
        return batchers[-1]

    yield make
    for batcher in batchers:
        batcher.close()


def test_one_request_gets_the_models_answer(make_batcher, model):
    batcher = make_batcher(model)
    out = batcher.submit(tagged(7, 3))
    assert out.tolist() == expected_rows(7, 3)
    assert model.sizes == [3]


def test_concurrent_requests_share_calls_and_get_their_own_rows(make_batcher, model):
    batcher = make_batcher(model, max_batch_size=64, max_delay_s=0.001)
    counts = {i: 1 + i % 4 for i in range(1, 41)}  # request id -> images in it
    with ThreadPoolExecutor(len(counts)) as pool:
        with worker_held(model):  # the first call blocks, so the others queue up behind it
            futures = {i: pool.submit(batcher.submit, tagged(i, n)) for i, n in counts.items()}
            wait_for_pile_up(batcher, model, sum(counts.values()))
        results = {i: f.result(timeout=10) for i, f in futures.items()}
    for i, n in counts.items():
        assert results[i].tolist() == expected_rows(i, n)
    assert sum(model.sizes) == sum(counts.values())
    assert len(model.sizes) < len(counts) and max(model.sizes) > 1  # batches really formed


def test_batches_never_exceed_the_limit_and_big_requests_are_split(make_batcher, model):
    batcher = make_batcher(model, max_batch_size=8)
    counts = {1: 20, 2: 3, 3: 8, 4: 1, 5: 13}
    with ThreadPoolExecutor(len(counts)) as pool:
        with worker_held(model):
            futures = {i: pool.submit(batcher.submit, tagged(i, n)) for i, n in counts.items()}
            wait_for_pile_up(batcher, model, sum(counts.values()))
        for i, n in counts.items():
            out = futures[i].result(timeout=10)
            assert out.tolist() == expected_rows(i, n)  # chunks put back in order
    assert max(model.sizes) <= 8 and sum(model.sizes) == sum(counts.values())


def test_a_lone_request_does_not_wait_for_max_delay(make_batcher, model):
    batcher = make_batcher(model, max_delay_s=LONG_DELAY)
    for _ in range(3):
        arrival = batcher.expect()  # announced, as the server does, and alone
        started = time.monotonic()
        batcher.submit(tagged(1, 1), arrival)
        assert time.monotonic() - started < LONG_DELAY / 5
    started = time.monotonic()
    batcher.submit(tagged(2, 2))  # not announced at all
    assert time.monotonic() - started < LONG_DELAY / 5
    assert model.sizes == [1, 1, 1, 2]


def test_a_forming_batch_waits_for_announced_requests(make_batcher, model):
    batcher = make_batcher(model, max_delay_s=LONG_DELAY)
    first, second = batcher.expect(), batcher.expect()
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(batcher.submit, tagged(1, 1), first)
        wait_until(lambda: queued(batcher) == 1)
        time.sleep(0.05)  # the worker holds the batch: the second caller is still "decoding"
        assert model.sizes == []
        b = pool.submit(batcher.submit, tagged(2, 2), second)
        assert a.result(timeout=LONG_DELAY / 5).tolist() == expected_rows(1, 1)
        assert b.result(timeout=LONG_DELAY / 5).tolist() == expected_rows(2, 2)
    assert model.sizes == [3]


def test_callers_announced_after_a_batch_formed_are_not_waited_for(make_batcher, model):
    batcher = make_batcher(model, max_delay_s=LONG_DELAY)
    with ThreadPoolExecutor(2) as pool:
        with worker_held(model):
            first = pool.submit(batcher.submit, tagged(1, 1))
            wait_for_pile_up(batcher, model, 1)
            second = pool.submit(batcher.submit, tagged(2, 1))  # queues behind the busy worker
            wait_until(lambda: queued(batcher) == 1)
            late = batcher.expect()  # a request that starts only now, and is slow to arrive
        started = time.monotonic()
        assert first.result(timeout=10).tolist() == expected_rows(1, 1)
        assert second.result(timeout=LONG_DELAY / 5).tolist() == expected_rows(2, 1)
        assert time.monotonic() - started < LONG_DELAY / 5
    late.withdraw()


def test_the_wait_for_announced_requests_is_bounded_by_max_delay(make_batcher, model):
    delay = 0.2
    batcher = make_batcher(model, max_delay_s=delay)
    batcher.expect()  # a request that never comes (and never withdraws)
    started = time.monotonic()
    batcher.submit(tagged(1, 1), batcher.expect())
    waited = time.monotonic() - started
    assert delay * 0.9 <= waited < delay + 3.0


def test_a_withdrawn_arrival_is_not_waited_for(make_batcher, model):
    batcher = make_batcher(model, max_delay_s=LONG_DELAY)
    doomed = batcher.expect()  # e.g. its image failed to decode
    doomed.withdraw()
    doomed.withdraw()  # twice is harmless
    started = time.monotonic()
    batcher.submit(tagged(1, 1), batcher.expect())
    assert time.monotonic() - started < LONG_DELAY / 5


def test_a_full_batch_does_not_wait_for_announced_requests(make_batcher, model):
    batcher = make_batcher(model, max_batch_size=4, max_delay_s=LONG_DELAY)
    batcher.expect()  # more is announced, but the batch is full already
    started = time.monotonic()
    assert batcher.submit(tagged(1, 4), batcher.expect()).tolist() == expected_rows(1, 4)
    assert time.monotonic() - started < LONG_DELAY / 5


def test_an_error_reaches_only_the_request_that_caused_it(make_batcher):
    model = RecordingModel(poison=3)
    batcher = make_batcher(model)
    with ThreadPoolExecutor(5) as pool:
        with worker_held(model):
            futures = {i: pool.submit(batcher.submit, tagged(i, 2)) for i in range(1, 6)}
            wait_for_pile_up(batcher, model, 10)
        for i, future in futures.items():
            if i == 3:
                with pytest.raises(ValueError, match="poisoned input 3"):
                    future.result(timeout=10)
            else:
                assert future.result(timeout=10).tolist() == expected_rows(i, 2)
    assert max(model.sizes) > 2  # the poisoned request did share a batch before the retry


def test_a_broken_model_fails_every_caller_and_the_batcher_survives(make_batcher):
    healthy = threading.Event()

    def broken(pixels):
        if not healthy.is_set():
            raise RuntimeError("session is gone")
        return pixels[:, 0, 0, :2].astype(np.float32)

    batcher = make_batcher(broken)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(batcher.submit, tagged(i, 1)) for i in range(3)]
        for future in futures:
            with pytest.raises(RuntimeError, match="session is gone"):
                future.result(timeout=10)
    healthy.set()
    assert batcher.submit(tagged(9, 1)).tolist() == expected_rows(9, 1)


def test_a_wrong_number_of_rows_is_an_error(make_batcher):
    batcher = make_batcher(lambda pixels: np.zeros((1, 2), np.float32))
    with pytest.raises(RuntimeError, match="1 rows for 2 inputs"):
        batcher.submit(tagged(1, 2))


def test_close_answers_what_is_queued_then_runs_submits_in_the_caller(model):
    batcher = MicroBatcher(model)
    with ThreadPoolExecutor(4) as pool:
        with worker_held(model):
            futures = {i: pool.submit(batcher.submit, tagged(i, 1)) for i in range(1, 5)}
            wait_for_pile_up(batcher, model, 4)
            batcher.close(timeout=0)  # does not wait; the worker must still answer the queue
        for i, future in futures.items():
            assert future.result(timeout=10).tolist() == expected_rows(i, 1)
    batcher.close()
    assert not batcher._thread.is_alive()
    before = len(model.threads)
    assert batcher.submit(tagged(5, 2), batcher.expect()).tolist() == expected_rows(5, 2)
    assert model.threads[before:] == [threading.current_thread().name]


def test_close_without_use_starts_no_thread(model):
    batcher = MicroBatcher(model)
    batcher.close()
    assert batcher._thread is None and batcher.closed


@pytest.mark.parametrize("kwargs", [{"max_batch_size": 0}, {"max_delay_s": -1}])
def test_bad_settings_are_refused(model, kwargs):
    with pytest.raises(ValueError):
        MicroBatcher(model, **kwargs)


class Versioned:
    """A stand-in for LoadedModel: predict answers its own version in every row."""

    def __init__(self, version: int):
        self.version = version
        self.threads: list[str] = []

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        return np.full((len(pixels), 1), float(self.version), np.float32)


def test_model_batchers_run_each_request_on_the_model_it_holds():
    batchers = ModelBatchers(lambda model: model.predict, max_batch_size=8, max_delay_s=0.001)
    old, new = Versioned(1), Versioned(2)
    batchers.use(old)
    arrival = batchers.expect(old)
    assert batchers.run(old, tagged(1, 2), arrival).tolist() == [[1.0], [1.0]]
    assert old.threads == ["convnet-batcher-v1"]
    batchers.use(new)  # the swap: a request still holding `old` is answered by `old`, directly
    late = batchers.expect(old)
    assert late is None
    assert batchers.run(old, tagged(1, 1)).tolist() == [[1.0]]
    assert old.threads[-1] == threading.current_thread().name
    assert batchers.run(new, tagged(1, 3), batchers.expect(new)).tolist() == [[2.0]] * 3
    assert new.threads == ["convnet-batcher-v2"]
    batchers.close()


def test_model_batchers_swap_under_concurrency_loses_nothing():
    batchers = ModelBatchers(lambda model: model.predict, max_batch_size=16, max_delay_s=0.001)
    models = [Versioned(v) for v in range(1, 6)]
    batchers.use(models[0])
    current = [models[0]]

    def request(i):
        model = current[0]  # what a request does: take the served model once, then use it
        return model.version, batchers.run(model, tagged(i % 200, 1 + i % 3),
                                           batchers.expect(model))

    with ThreadPoolExecutor(16) as pool:
        futures = []
        for model in models[1:]:
            futures += [pool.submit(request, i) for i in range(100)]
            batchers.use(model)
            current[0] = model
        futures += [pool.submit(request, i) for i in range(100)]
        for future in futures:
            version, out = future.result(timeout=10)
            assert set(out.ravel().tolist()) == {float(version)}
    batchers.close()


def test_model_batchers_with_batch_size_one_call_the_model_directly():
    batchers = ModelBatchers(lambda model: model.predict, max_batch_size=1)
    model = Versioned(3)
    batchers.use(model)
    assert batchers.expect(model) is None
    assert batchers.run(model, tagged(1, 2)).tolist() == [[3.0], [3.0]]
    assert model.threads == [threading.current_thread().name]


def batch_calls(client) -> tuple[float, float]:
    """(images, calls) summed by the images-per-inference-call histogram in /metrics."""
    text = client.get("/metrics").get_data(as_text=True)
    values = dict(re.findall(r"^convnet_inference_batch_images_(sum|count) (\S+)$", text, re.M))
    return float(values["sum"]), float(values["count"])


@pytest.mark.parametrize("batch_max_size,batched", [(64, True), (1, False)])
def test_the_app_batches_concurrent_requests_from_every_door(model_root, monkeypatch,
                                                             batch_max_size, batched):
    from conftest import image_bytes

    from convnet.serve import create_app
    from convnet.serve.model import LoadedModel

    monkeypatch.setenv("CONVNET_BATCH_MAX_SIZE", str(batch_max_size))  # as the env var
    app = create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0, "TESTING": True})
    real_predict = LoadedModel.predict

    def slow_predict(self, pixels):
        time.sleep(0.05)  # long enough for the other requests to queue up behind this call
        return real_predict(self, pixels)

    monkeypatch.setattr(LoadedModel, "predict", slow_predict)
    colors = {"airplane": (255, 0, 0), "automobile": (0, 255, 0), "bird": (0, 0, 255)}
    red_b64 = base64.b64encode(image_bytes(colors["airplane"])).decode()

    def ask(i):
        client = app.test_client()
        label = list(colors)[i % 3]
        if i % 4 == 3:  # TF Serving's door, same batcher
            response = client.post("/v1/models/cifar10:predict",
                                   json={"instances": [{"b64": red_b64}]})
            probs = response.get_json()["predictions"][0]
            return "airplane", ["airplane", "automobile", "bird"][int(np.argmax(probs[:3]))]
        response = client.post("/api/v1/predict", data=image_bytes(colors[label]),
                               content_type="image/png")
        return label, response.get_json()["predictions"][0]["label"]

    requests = 16
    with ThreadPoolExecutor(requests) as pool:
        for wanted, got in pool.map(ask, range(requests)):
            assert got == wanted
    images, calls = batch_calls(app.test_client())
    assert images == requests
    assert (calls < requests) == batched
    app.extensions["convnet.batchers"].close()


@pytest.mark.parametrize("setting", [{"BATCH_MAX_SIZE": 0}, {"BATCH_MAX_DELAY_MS": -1}])
def test_the_app_refuses_bad_batch_settings(model_root, setting):
    from convnet.serve import create_app

    with pytest.raises(ValueError, match="BATCH_MAX"):
        create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0, **setting})
