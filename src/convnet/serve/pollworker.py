"""The gunicorn worker `convnet serve` runs on Linux: request threads that wait for their own work.

gthread's main thread watches every kept-alive connection, hands the one that becomes readable
to its thread pool through a queue, and gets it back through a pipe when the request is done:
three hand-offs between threads for every request, each a wake-up and a turn at the GIL. Here
the request threads wait on one shared epoll set themselves, in which each idle connection is
armed for a single event (EPOLLONESHOT): the thread the kernel wakes for it reads the request,
answers it and arms the connection again. The main thread only accepts (standing back when
another worker holds fewer connections: worker.py), expires idle connections after gunicorn's
keepalive setting, and runs the shutdown, which keeps worker.py's guarantees: listeners closed
at once, requests in flight answered within graceful_timeout, idle connections kept for
STOP_KEEPALIVE_LINGER at most, any request on one meanwhile answered with "Connection: close".

What it bought on 2 cores at concurrency 64 (README, *Serving under load*): 6 thread switches a
request instead of 11, 7% less CPU per request, and enough of both that 16 threads per worker
(batches of 8) now pay where they did not under gthread.

Where select.epoll is missing (not Linux) server.py runs worker.DrainingThreadWorker instead.
"""

from __future__ import annotations

import math
import select
import selectors
import socket
import threading
import time

from gunicorn.http.body import LengthReader
from gunicorn.workers.gthread import _DEFER, STOP_KEEPALIVE_LINGER, TConn

from convnet.serve.worker import DrainingThreadWorker

ARMED = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT if hasattr(select, "epoll") \
    else 0


class ClientSocket(socket.socket):
    """A client connection's socket that makes no system call to set the timeout it already
    has. CPython's settimeout and setblocking always make one, letting go of the GIL around it,
    and gunicorn calls them several times a request, mostly with the value already set."""

    def settimeout(self, value):
        if value != self.gettimeout():
            super().settimeout(value)

    def setblocking(self, flag):
        self.settimeout(None if flag else 0.0)  # what setblocking means (Python's docs)


class PollingThreadWorker(DrainingThreadWorker):
    def init_process(self):
        self._lock = threading.Lock()  # for nr_conns and _idle, which every thread changes
        # Connections armed in _ready, waiting for a request, by descriptor, oldest first.
        # gthread's handle_request reads len(keepalived_conns) to cap kept-alive connections.
        self._idle: dict[int, TConn] = {}
        self.keepalived_conns = self._idle  # type: ignore[assignment]
        self._ready = select.epoll()
        self._stopped = threading.Event()  # the request threads' signal to end
        self._linger_until = math.inf  # no idle connection outlives this (set when stopping)
        super().init_process()

    def run(self):
        for number in range(self.cfg.threads):
            threading.Thread(target=self._serve_connections, daemon=True,
                             name=f"convnet-requests-{number}").start()
        self.poller.register(self.method_queue.fileno(), selectors.EVENT_READ,
                             self.method_queue.run_callbacks)  # so that SIGTERM wakes this loop
        self.set_accept_enabled(True)
        while self.alive:
            self.notify()
            can_accept = self.nr_conns < self.worker_connections
            if can_accept != self._accepting:
                self.set_accept_enabled(can_accept)
            self.wait_for_and_dispatch_events(timeout=self._expire_idle())
            if not self.is_parent_alive():
                break

        self.set_accept_enabled(False)  # worker.py: refuse new connections, take queued ones
        self._linger_until = time.monotonic() + STOP_KEEPALIVE_LINGER
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self.nr_conns > 0 and time.monotonic() < deadline:
            self.notify()
            self.wait_for_and_dispatch_events(timeout=min(self._expire_idle(), 0.1))
        self._expire_idle(everything=True)
        self._stopped.set()
        self.poller.close()
        self.method_queue.close()
        for listener in self.sockets:
            listener.close()

    def _take(self, listener) -> bool:
        try:
            accepted, address = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return False  # another worker took it, or the client gave up
        client = ClientSocket(accepted.family, accepted.type, accepted.proto,
                              fileno=accepted.detach())
        with self._lock:
            self.nr_conns += 1
        conn = TConn(self.cfg, client, address, listener.getsockname())
        try:
            self._arm(conn, new=True)
        except OSError:
            self._close(conn)
        return True

    def _arm(self, conn: TConn, new: bool = False) -> None:
        """Wait for `conn`'s next request, for gunicorn's keepalive at most (less when
        stopping, see _expire_idle): the first request thread woken for it takes it."""
        conn.set_timeout()
        fd = conn.sock.fileno()
        with self._lock:
            self._idle[fd] = conn  # first: the event may wake a request thread at once
        try:
            if new:
                self._ready.register(fd, ARMED)
            else:
                self._ready.modify(fd, ARMED)
        except OSError:
            with self._lock:
                self._idle.pop(fd, None)  # the caller closes it
            raise

    def _serve_connections(self) -> None:
        """A request thread: take the next readable connection, answer it, arm it again."""
        while not self._stopped.is_set():
            try:
                events = self._ready.poll(1.0, 1)
            except InterruptedError:
                continue
            for fd, _ in events:
                with self._lock:
                    conn = self._idle.pop(fd, None)
                if conn is not None:  # None: expired and closed by the main thread meanwhile
                    self._serve(conn)

    def _serve(self, conn: TConn) -> None:
        try:
            outcome = self.handle(conn)  # gthread's: True to keep the connection
            while outcome is True and conn.parser.unreader.buf.getvalue():
                outcome = self.handle(conn)  # the client sent its next request already
            # _DEFER: a new connection sent nothing within gthread's data timeout
            if outcome is True or (outcome is _DEFER and self.alive):
                self._arm(conn)  # left blocking: epoll does not mind, and that saves a call
                return
        except Exception:
            self.log.exception("Error serving a connection")
        self._close(conn, graceful=True)

    def _keepalive_after(self, conn, keepalive):
        # gthread drains what the app left unread of the body, setting and restoring a socket
        # timeout around the read; a body read to its end has nothing left to drain.
        body = getattr(conn.parser.mesg, "body", None) if keepalive else None
        reader = getattr(body, "reader", None)
        if (body is not None and isinstance(reader, LengthReader) and reader.length == 0
                and not body.failed and body.buf.tell() == 0):
            return True
        return super()._keepalive_after(conn, keepalive)

    def _close(self, conn: TConn, graceful: bool = False) -> None:
        with self._lock:
            self.nr_conns -= 1
        conn.close(graceful=graceful)  # closing its socket also takes it out of _ready

    def _expire_idle(self, everything: bool = False) -> float:
        """Close the idle connections whose keepalive (or, stopping, the linger) ran out, every
        idle one if `everything`; seconds until the next one runs out (1.0 at most)."""
        now = time.monotonic()
        expired, next_due = [], now + 1.0
        with self._lock:
            for fd, conn in self._idle.items():  # oldest first, so the rest run out later
                due = min(conn.timeout, self._linger_until)
                if not everything and due > now:
                    next_due = due
                    break
                expired.append(fd)
            gone = [self._idle.pop(fd) for fd in expired]
        for conn in gone:
            self._close(conn)
        return max(0.0, min(next_due - now, 1.0))
