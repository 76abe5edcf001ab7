"""gthread with a shutdown that loses no connection, and connections spread over the workers.

`convnet serve` runs this worker where Linux's epoll is missing, and pollworker.py's, built on
it, where it is not.

On SIGTERM (docker stop, the kubelet) gthread stops accepting at once but keeps its listening
socket open until its requests in flight are done; connections the kernel completes meanwhile
wait in the listen backlog and are reset when that socket finally closes: the client connected,
sent its request, and got a reset. This worker instead closes its listeners straight away, so
that every later connection is refused (a client or proxy can retry elsewhere) and every accepted
one is answered within graceful_timeout. Closing alone still leaves a window: a handshake the
kernel completes between the last accept and the close is reset too (about 1 stop in 10 under 8
busy clients). So first a socket filter drops new SYNs (Linux; the client's retransmission a second
later meets the closed port and is refused), handshakes under way finish for SETTLE_SECONDS, and
only then is the queue emptied and the listener closed.
tests/test_deploy_k8s.py measures it under load; bench/serve_deploy.py for longer.

STOPPING is set in the worker from the moment SIGTERM arrives: /readyz answers 503 from then on
to whoever still reaches it on a kept-alive connection; new connections are refused anyway.

New connections are spread over the workers by connections.ConnectionLedger: a worker holding
more than the least busy one stands back from its listeners for PAUSE_S at a time (for at most
DEFER_LIMIT_S per connection) so that the other can accept.
"""

from __future__ import annotations

import ctypes
import select
import selectors
import socket
import struct
import threading
import time

from gunicorn.workers.gthread import ThreadWorker

from convnet.serve import connections
from convnet.serve.connections import DEFER_LIMIT_S, PAUSE_S, SLACK, ConnectionLedger

STOPPING = threading.Event()
SETTLE_SECONDS = 0.05  # for handshakes already under way when new SYNs start being dropped
SO_ATTACH_FILTER = 26  # Linux
# Classic BPF over the TCP header: flags & (SYN|ACK) == SYN (a new connection) -> drop, else keep.
DROP_NEW_SYNS = [
    (0x30, 0, 0, 13),  # ldb [13]: the flags byte
    (0x54, 0, 0, 0x12),  # and #(SYN|ACK)
    (0x15, 1, 0, 0x02),  # jeq #SYN -> drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret: keep the packet
    (0x06, 0, 0, 0),  # drop: ret 0
]


def refuse_new_connections(sock) -> bool:
    """Drop new SYNs on listening socket `sock` from now on; False where that is not possible
    (not Linux, not TCP)."""
    code = b"".join(struct.pack("HBBI", *insn) for insn in DROP_NEW_SYNS)
    program = (ctypes.c_ubyte * len(code)).from_buffer_copy(code)
    fprog = struct.pack("HP", len(DROP_NEW_SYNS), ctypes.addressof(program))
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


class DrainingThreadWorker(ThreadWorker):
    # Set on the worker object by the master's pre_fork hook (server.py); None: no balancing.
    ledger: ConnectionLedger | None = None
    ledger_slot: int | None = None
    _nr_conns = 0
    _paused_until: float | None = None  # listeners unwatched until then (standing back)
    _deferring_since: float | None = None  # when this worker first stood back from the backlog

    def init_process(self):
        if self.ledger is not None and self.ledger_slot is not None:
            connections.current = (self.ledger, self.ledger_slot)
        super().init_process()

    @property
    def nr_conns(self) -> int:  # gthread's count of this worker's open connections
        return self._nr_conns

    @nr_conns.setter
    def nr_conns(self, value: int) -> None:
        self._nr_conns = value
        self._publish()

    def _publish(self) -> None:
        if self.ledger is not None and self.ledger_slot is not None:
            accepting = getattr(self, "_accepting", False) and self.alive
            self.ledger.publish(self.ledger_slot, self._nr_conns, accepting)

    def accept(self, listener) -> None:  # the listeners' callback in gthread's poller
        self._accept(listener)

    def _accept(self, listener) -> bool:
        """Take a connection waiting on `listener` unless this worker should stand back;
        whether one was taken."""
        if self._should_stand_back():
            self._pause_listeners()
            return False
        self._deferring_since = None
        return self._take(listener)

    def _take(self, listener) -> bool:
        """gthread's accept, telling whether there was a connection to take."""
        before = self.nr_conns  # only this (the main) thread changes it in gthread
        super().accept(listener)
        return self.nr_conns != before

    def _should_stand_back(self) -> bool:
        """Whether another accepting worker holds more than SLACK fewer connections, and the
        waiting connection has not yet been left to it for DEFER_LIMIT_S."""
        if self.ledger is None or self.ledger_slot is None or not self.alive:
            return False
        fewest = self.ledger.fewest_elsewhere(self.ledger_slot)
        if fewest is None or self._nr_conns <= fewest + SLACK:
            return False
        now = time.monotonic()
        if self._deferring_since is None:
            self._deferring_since = now
        return now - self._deferring_since < DEFER_LIMIT_S

    def _pause_listeners(self) -> None:
        for listener in self.sockets:
            self.poller.unregister(listener)
        self._paused_until = time.monotonic() + PAUSE_S

    def _resume_listeners(self) -> None:
        self._paused_until = None
        for listener in self.sockets:
            self.poller.register(listener, selectors.EVENT_READ, self.accept)
        if not select.select(self.sockets, [], [], 0)[0]:
            self._deferring_since = None  # another worker took it: the next one starts afresh

    def wait_for_and_dispatch_events(self, timeout):
        if self._paused_until is not None:
            left = self._paused_until - time.monotonic()
            if left <= 0:
                self._resume_listeners()
            else:
                timeout = min(timeout, left)
        super().wait_for_and_dispatch_events(timeout)

    def handle_exit(self, sig, frame):
        STOPPING.set()
        super().handle_exit(sig, frame)
        self._publish()  # no longer accepting: others stop leaving connections to it

    def set_accept_enabled(self, enabled):
        if self._paused_until is not None:
            self._resume_listeners()  # so that gthread finds them registered, as it left them
        try:
            self._set_accept_enabled(enabled)
        finally:
            self._publish()

    def _set_accept_enabled(self, enabled):
        # gunicorn >= 27 calls this with False once, as the worker starts to stop; older gthread
        # workers never call it, and keep their own shutdown.
        stopping = not enabled and not self.alive and self._accepting
        if stopping:
            filtered = [refuse_new_connections(listener) for listener in self.sockets]
            if any(filtered):
                time.sleep(SETTLE_SECONDS)
            for listener in self.sockets:
                # Take every connection already queued; the listener is non-blocking here.
                while select.select([listener], [], [], 0)[0]:
                    if not self._accept(listener):  # another worker took it first
                        break
        super().set_accept_enabled(enabled)
        if stopping:
            for listener in self.sockets:
                listener.close()  # the last copy closed: the kernel now refuses connections
