"""The gunicorn worker `convnet serve` runs: gthread, with a shutdown that loses no connection.

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
"""

from __future__ import annotations

import ctypes
import select
import socket
import struct
import threading
import time

from gunicorn.workers.gthread import ThreadWorker

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
    def handle_exit(self, sig, frame):
        STOPPING.set()
        super().handle_exit(sig, frame)

    def set_accept_enabled(self, enabled):
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
                    before = self.nr_conns
                    self.accept(listener)
                    if self.nr_conns == before:  # another worker took it first
                        break
        super().set_accept_enabled(enabled)
        if stopping:
            for listener in self.sockets:
                listener.close()  # the last copy closed: the kernel now refuses connections
