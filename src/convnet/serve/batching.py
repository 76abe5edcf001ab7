"""Dynamic micro-batching: concurrent requests in one serving process share an inference call.

ONNX Runtime answers a batch of 32 images much faster than 32 batches of one, but an HTTP request
usually carries one image. A `MicroBatcher` owns one worker thread; request threads `submit` their
(n, S, S, 3) uint8 arrays and block, the worker concatenates what is queued into one call and
hands each caller its own rows of the answer, in order.

When does the worker run a batch? It never sleeps on a guess:

* Whatever is queued runs as soon as the worker is free. A lone request, with nothing else in the
  process, is answered at once: no max_delay is added to it.
* Under load, batches form by themselves: requests that arrive while the worker is busy in ONNX
  Runtime (which releases the GIL, so other threads keep decoding) queue up and go together next.
* The worker waits, up to `max_delay_s` after the oldest queued request arrived, only while more
  work is known to be on its way: callers may `expect()` an arrival before they start decoding
  (the server does it when an inference request starts), and the worker holds a forming batch
  while callers that announced themselves *before* the batch's first request queued have not
  submitted yet, and the batch is not full. That is TF Serving's `batch_timeout_micros`,
  applied only when someone already in flight is about to join: it buys larger batches under
  concurrency, costs nothing to a request that is alone, and never holds a batch for callers
  that only started afterwards (under steady load there always are some).

A request with more images than `max_batch_size` is split into chunks that queue back to back
(so no batch is ever larger than the limit), and its answers are put back together. If a batch
of several requests fails, each request is retried alone, so an exception reaches only the caller
whose input caused it (and every caller if the model itself is broken). `close()` answers what is
queued, then stops the thread; a batcher used after `close()` (a request that picked up a model
just before a hot swap) runs the caller's images directly in the caller's thread, so nothing
fails during a swap.

    batcher = MicroBatcher(model.predict, max_batch_size=64, max_delay_s=0.002)
    arrival = batcher.expect()          # optional: "an image is coming", before decoding
    probs = batcher.submit(pixels, arrival)   # (n, S, S, 3) uint8 -> (n, C)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

log = logging.getLogger(__name__)

Infer = Callable[[np.ndarray], np.ndarray]  # (N, ...) inputs -> (N, ...) outputs, row for row


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(eq=False)
class _Job:
    pixels: np.ndarray  # (n, S, S, 3) uint8, n <= max_batch_size
    announced_before: int  # arrivals with a lower ticket were announced before this job queued
    queued_at: float = field(default_factory=time.monotonic)  # seconds, monotonic clock
    finished: bool = False
    result: np.ndarray | None = None
    error: BaseException | None = None
    # Released once, when finished. Not a threading.Event, whose set() wakes the waiter while
    # holding the Event's own lock, which the waiter then needs too: one wake-up, not two.
    _done: threading.Lock = field(default_factory=_held_lock)

    def finish(self, result: np.ndarray | None = None, error: BaseException | None = None):
        self.result, self.error, self.finished = result, error, True
        self._done.release()

    def wait(self) -> None:
        self._done.acquire()
        self._done.release()  # so that a second wait returns too


class Arrival:
    """A caller's announcement that it will submit soon. Pass it to `submit`, or `withdraw()` it
    if the request fails before inference (withdrawing twice, or after submitting, is harmless)."""

    def __init__(self, batcher: MicroBatcher | None, ticket: int = -1):
        self._batcher = batcher
        self.ticket = ticket  # announcement number, in order

    def withdraw(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher._arrival_done(self.ticket)


class MicroBatcher:
    """Group concurrent `submit` calls into batched calls of `infer`, run by one worker thread.

    infer: called with (N, ...) arrays, N <= max_batch_size; must return N rows in order.
    max_batch_size: images per inference call, at most.
    max_delay_s: seconds a formed batch may wait for announced requests (see the module doc).
    """

    def __init__(self, infer: Infer, max_batch_size: int = 64, max_delay_s: float = 0.002, *,
                 name: str = "convnet-batcher"):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must not be negative, got {max_delay_s}")
        self.infer = infer
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.name = name
        self._queue: deque[_Job] = deque()
        self._queued_images = 0
        self._tickets = 0  # arrivals announced so far
        self._expected: set[int] = set()  # tickets of announced arrivals not submitted yet
        self._closed = False
        self._wake = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None  # started on the first submit

    @property
    def closed(self) -> bool:
        return self._closed

    def expect(self) -> Arrival:
        """Announce a coming `submit`, so a forming batch waits (up to max_delay) for it."""
        with self._wake:
            if self._closed:
                return Arrival(None)
            ticket = self._tickets
            self._tickets += 1
            self._expected.add(ticket)
        return Arrival(self, ticket)

    def _arrival_done(self, ticket: int) -> None:
        with self._wake:
            self._expected.discard(ticket)
            self._wake.notify()

    def submit(self, pixels: np.ndarray, arrival: Arrival | None = None) -> np.ndarray:
        """Run `pixels` (n, ...) through `infer` in some batch and return its n rows. Blocks; raises
        what `infer` raised for these images."""
        if arrival is not None and arrival._batcher is not self:
            arrival.withdraw()  # announced to a batcher since retired by a hot swap
            arrival = None
        count = len(pixels)
        with self._wake:
            if arrival is not None:
                arrival._batcher = None
                self._expected.discard(arrival.ticket)
            if self._closed or count == 0:
                jobs = None  # answered below, outside the lock
            else:
                jobs = [_Job(pixels[i : i + self.max_batch_size], self._tickets)
                        for i in range(0, count, self.max_batch_size)]
                self._queue.extend(jobs)
                self._queued_images += count
                self._start_worker()
                self._wake.notify()
        if jobs is None:
            return self.infer(pixels)
        for job in jobs:
            job.wait()
        errors = [job.error for job in jobs if job.error is not None]
        if errors:
            raise errors[0]
        results = [cast(np.ndarray, job.result) for job in jobs]  # no error: each has its result
        return results[0] if len(results) == 1 else np.concatenate(results)

    def close(self, timeout: float | None = 10.0) -> None:
        """Answer everything queued, then stop the worker. Waits up to `timeout` seconds for it
        (None: forever, 0: do not wait). Later submits run directly in their caller's thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and timeout != 0:
            thread.join(timeout)

    def _start_worker(self) -> None:
        if self._thread is None:  # called with the lock held
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()

    def _next_batch(self) -> list[_Job] | None:
        """Block until a batch should run; take it off the queue. None once closed and empty."""
        with self._wake:
            while not self._queue and not self._closed:
                self._wake.wait()
            if not self._queue:
                return None
            first = self._queue[0]
            deadline = first.queued_at + self.max_delay_s
            while (self._queued_images < self.max_batch_size and not self._closed
                   and self._waiting_for(first)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.wait(remaining)
            batch, size = [], 0
            while self._queue and size + len(self._queue[0].pixels) <= self.max_batch_size:
                job = self._queue.popleft()
                batch.append(job)
                size += len(job.pixels)
            self._queued_images -= size
            return batch

    def _waiting_for(self, first: _Job) -> bool:
        """Whether a caller that was already on its way when `first` queued has yet to submit.
        Later announcements are not waited for: under steady load there always are some, and
        waiting for them would hold every batch for the full max_delay."""
        return any(ticket < first.announced_before for ticket in self._expected)

    def _work(self) -> None:
        batch: list[_Job] = []
        try:
            while True:
                batch = self._next_batch() or []
                if not batch:
                    return
                self._run(batch)
                batch = []
        finally:  # only reached early if something in here is badly wrong: never strand callers
            with self._wake:
                self._closed = True  # later submits run in their own threads
                stranded = [*batch, *self._queue]
                self._queue.clear()
            for job in stranded:
                if not job.finished:
                    job.finish(error=RuntimeError(f"{self.name}: the batching thread stopped"))

    def _run(self, batch: list[_Job]) -> None:
        pixels = batch[0].pixels if len(batch) == 1 else np.concatenate([j.pixels for j in batch])
        try:
            out = self.infer(pixels)
            if len(out) != len(pixels):
                raise RuntimeError(f"inference returned {len(out)} rows for {len(pixels)} inputs")
        except Exception as exc:
            if len(batch) == 1:
                batch[0].finish(error=exc)
                return
            log.warning("a batch of %d requests failed (%r); retrying each alone", len(batch), exc)
            for job in batch:
                self._run([job])
            return
        start = 0
        for job in batch:
            job.finish(result=out[start : start + len(job.pixels)])
            start += len(job.pixels)


class ModelBatchers:
    """The batcher of the model being served, replaced whenever the model is (hot reload).

    Requests hold the model they started with (see `convnet.serve.holder`), so each must be run
    by that model: a request for the current model joins its batcher; a request still holding
    the previous model after a swap runs directly in its own thread (the previous batcher first
    answers what it had queued, then stops). With max_batch_size 1 nothing is batched.

    make_infer(model) -> infer: what a batch of `model` runs (e.g. predict plus metrics).
    Several models (or versions) are served side by side in slots (`ModelHolder.slot`): a model
    replaces the one in its own slot only.
    """

    def __init__(self, make_infer: Callable[[Any], Infer], *, max_batch_size: int = 64,
                 max_delay_s: float = 0.002):
        self.make_infer = make_infer
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        # slot -> (model, its batcher); replaced, never mutated, so requests can read it
        self._slots: dict[object, tuple[object, MicroBatcher | None]] = {}

    def use(self, model, slot: object = None) -> None:
        """Serve `model` from now on in `slot` (called when it is loaded)."""
        batcher = None
        if self.max_batch_size > 1:
            batcher = MicroBatcher(self.make_infer(model), self.max_batch_size,
                                   self.max_delay_s, name=f"convnet-batcher-v{_version(model)}")
        previous = self._slots.get(slot)
        self._slots = {**self._slots, slot: (model, batcher)}  # one atomic assignment
        if previous is not None and previous[1] is not None:
            previous[1].close(timeout=0)  # its worker answers its queue, then exits

    def drop(self, slot: object) -> None:
        """Stop serving the model in `slot` (its model left the config)."""
        slots = dict(self._slots)
        previous = slots.pop(slot, None)
        self._slots = slots
        if previous is not None and previous[1] is not None:
            previous[1].close(timeout=0)

    def _batcher_for(self, model) -> MicroBatcher | None:
        for served, batcher in self._slots.values():
            if served is model:
                return batcher
        return None

    def expect(self, model) -> Arrival | None:
        """Announce a request for `model` that will call `run` soon (None: nothing to announce)."""
        batcher = self._batcher_for(model)
        return batcher.expect() if batcher is not None else None

    def run(self, model, pixels: np.ndarray, arrival: Arrival | None = None) -> np.ndarray:
        """`model`'s answer for pixels (n, ...), batched with concurrent requests if possible."""
        batcher = self._batcher_for(model)
        if batcher is not None:
            return batcher.submit(pixels, arrival)
        if arrival is not None:
            arrival.withdraw()
        return self.make_infer(model)(pixels)

    def close(self) -> None:
        slots, self._slots = self._slots, {}
        for _, batcher in slots.values():
            if batcher is not None:
                batcher.close()


def _version(model) -> str:
    return str(getattr(model, "version", "?"))
