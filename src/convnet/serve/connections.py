"""Open connections per gunicorn worker, in memory the master shares with its workers.

Why: a kept-alive connection stays with the worker that accepted it, and gthread workers race for
each new one, so a burst of clients (a load balancer's or client library's connection pool
opening at once) can land almost entirely on one worker: 64 connections split 1/63 in
measurements on 2 cores, where each worker can use about one core for its model. With this
ledger a worker that holds more connections than the least busy accepting worker (by more than
SLACK) stands back for a moment and lets that one take the connection (worker.py). It is a
preference, not a rule: a connection nobody else takes within DEFER_LIMIT_S is accepted anyway,
so a hung or busy worker never holds a connection up for longer than that.

The master makes the ledger before the first fork and gives each worker a slot (pre_fork), which
it frees when the worker exits (child_exit). Values are single 8-byte words, each written by one
process only (a worker its own slot, the master a slot it frees), so no lock is needed: a reader
may see a count a connection old, which only makes the balance a connection less exact.
/metrics shows the counts as convnet_worker_connections.
"""

from __future__ import annotations

import mmap

SLOTS = 256  # workers at once; beyond that a worker simply does not balance
FREE = -1  # count of a slot no live worker holds
SLACK = 1  # connections a worker may hold above the least busy one before it stands back
PAUSE_S = 0.002  # how long a worker that stands back stops watching its listeners
DEFER_LIMIT_S = 0.02  # a connection still waiting after this is accepted by whoever sees it


class ConnectionLedger:
    """Per slot: the open connections of the worker in it (FREE: none there) and whether that
    worker accepts new ones now (not when stopping, or at its worker_connections)."""

    def __init__(self, slots: int = SLOTS):
        # Anonymous and shared: the workers forked later see the master's pages, and each other's.
        self._memory = mmap.mmap(-1, 8 * (2 * slots + 1))
        words = memoryview(self._memory).cast("q")
        self.counts, self.accepting = words[:slots], words[slots:2 * slots]
        self._used = words[2 * slots:]  # [0]: slots below this may be live (readers scan these)
        for slot in range(slots):
            self.counts[slot] = FREE

    def claim(self) -> int | None:
        """A free slot for a worker about to be forked (master), None when all are taken."""
        for slot, count in enumerate(self.counts):
            if count == FREE:
                self.accepting[slot] = 0
                self.counts[slot] = 0
                self._used[0] = max(self._used[0], slot + 1)
                return slot
        return None

    def release(self, slot: int | None) -> None:
        """The worker in `slot` has exited (master)."""
        if slot is not None:
            self.accepting[slot] = 0
            self.counts[slot] = FREE

    def publish(self, slot: int, count: int, accepting: bool) -> None:
        """The worker in `slot` holds `count` connections and does (not) accept more."""
        self.counts[slot] = count
        self.accepting[slot] = int(accepting)

    def fewest_elsewhere(self, slot: int) -> int | None:
        """The fewest connections any other accepting worker holds; None if none accepts."""
        others = [count for other, count in enumerate(self.counts[:self._used[0]])
                  if other != slot and count != FREE and self.accepting[other]]
        return min(others) if others else None

    def live(self) -> dict[int, tuple[int, bool]]:
        """Slot -> (open connections, whether it accepts new ones), for every live worker. A
        worker still starting (or stopping, or at its connection cap) does not accept."""
        return {slot: (count, bool(self.accepting[slot]))
                for slot, count in enumerate(self.counts[:self._used[0]]) if count != FREE}


# The ledger and slot of the worker this process is, once it has started (worker.py); None in
# the master, under Flask's test client, or with another server.
current: tuple[ConnectionLedger, int] | None = None


class LedgerCollector:
    """convnet_worker_connections and convnet_worker_accepting for /metrics, read from this
    process's ledger when it has one."""

    def collect(self):
        # Imported here: the master imports this module before it points prometheus_client at
        # the shared samples folder, and importing prometheus_client fixes that choice.
        from prometheus_client.core import GaugeMetricFamily

        if current is None:
            return
        family = GaugeMetricFamily(
            "convnet_worker_connections",
            "Open client connections per gunicorn worker (by slot; a replaced worker reuses its "
            "slot). Kept-alive connections stay with one worker, so an even spread matters.",
            labels=["worker"])
        accepting = GaugeMetricFamily(
            "convnet_worker_accepting",
            "1 while the gunicorn worker in this slot takes new connections; 0 while it starts, "
            "stops, or holds its worker_connections.", labels=["worker"])
        for slot, (count, accepts) in current[0].live().items():
            family.add_metric([str(slot)], count)
            accepting.add_metric([str(slot)], int(accepts))
        yield family
        yield accepting
