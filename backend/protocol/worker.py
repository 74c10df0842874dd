"""The gunicorn worker `llm-ner serve` runs: gunicorn's threaded worker (gthread), changed so that
slow clients and a busy /predict never keep /health and /setup waiting.

1. A request's head is read in the worker's main loop, without blocking, before a thread is given
   to it. An idle connection, or one that sends its headers a line every few seconds (slowloris),
   costs a socket, not a thread; a head not complete within HEAD_TIMEOUT closes the connection.
   (gthread gives a new connection a thread first, which then waits up to 5 s for its first byte and
   for ever for the rest of its head.)
2. Two pools of threads. /health, /, /setup and /metrics are cheap and Label Studio gives them 1 s
   (/health) and 3 s (/setup): they run in a small pool of their own, which the /predict calls
   filling the main pool (each waiting on the LLM, for up to PREDICT_DEADLINE) never hold up.
3. Once a thread has a request, each read and write of its socket gives up after IO_TIMEOUT: a
   client that stops sending its body, or stops reading the answer, gives its thread back.

What is left to a front proxy (README, "Production"): TLS, client body upload limits by rate, and
connection counts per client; this worker keeps at most `worker_connections` (1000) open.
"""

from __future__ import annotations

import errno
import selectors
import time
from collections import deque
from concurrent import futures
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import TConn, ThreadWorker

CONTROL_PATHS = frozenset({"/", "/health", "/setup", "/metrics"})
CONTROL_THREADS = 4
HEAD_TIMEOUT = 10.0  # seconds for a whole request head to arrive
MAX_HEAD = 64 * 1024  # a longer head goes to a thread, whose parser answers it with gunicorn's 4xx
IO_TIMEOUT = 30.0  # seconds a blocking read or write of a client socket may wait


class _TimedSocket:
    """A client socket whose blocking reads and writes give up after IO_TIMEOUT (gthread's wait for
    ever). Everything else is the socket's own."""

    __slots__ = ("_sock",)

    def __init__(self, sock: Any):
        self._sock = sock

    def setblocking(self, flag: bool) -> None:
        self._sock.settimeout(IO_TIMEOUT if flag else 0.0)

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _path_of(head: bytes) -> str:
    """The path of the request line `METHOD /path?query HTTP/1.1`, without its query."""
    line = head.split(b"\r\n", 1)[0].split(b" ")
    target = line[1] if len(line) >= 2 else b""
    return target.split(b"?", 1)[0].decode("latin-1")


class GuardedThreadWorker(ThreadWorker):
    def init_process(self) -> None:
        self.control_pool = futures.ThreadPoolExecutor(max_workers=CONTROL_THREADS, thread_name_prefix="control")
        self.reading: deque[TConn] = deque()  # connections whose head is being read, oldest deadline first
        super().init_process()

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.control_pool.shutdown(wait=False)

    # ---- reading heads in the main loop ----
    def accept(self, listener: Any) -> None:
        if self.cfg.is_ssl:  # a TLS handshake cannot be read this way: gthread's own path
            super().accept(listener)
            return
        try:
            client, address = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client, address, listener.getsockname())
        conn.sock = _TimedSocket(conn.sock)
        self._read_head(conn)

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        """A kept-alive connection has more: its next request's head is read like a new one's."""
        if self.cfg.is_ssl:
            super().on_client_socket_readable(conn, client)
            return
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._read_head(conn)

    def _read_head(self, conn: TConn) -> None:
        conn.sock.setblocking(False)
        conn.head = bytearray()
        conn.head_deadline = time.monotonic() + HEAD_TIMEOUT
        self.reading.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_data, conn))

    def _on_head_data(self, conn: TConn, client: Any) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away before its head was whole
            self._stop_reading(conn)
            self.nr_conns -= 1
            util.close(conn.sock)
            return
        conn.head += data
        if b"\r\n\r\n" not in conn.head and len(conn.head) <= MAX_HEAD:
            return
        self._stop_reading(conn)
        conn.init()  # the parser, if the connection has none yet; no I/O without TLS
        conn.parser.unreader.unread(bytes(conn.head))
        conn.data_ready = True
        conn.control = _path_of(conn.head) in CONTROL_PATHS
        self.enqueue_req(conn)

    def _stop_reading(self, conn: TConn) -> None:
        self.poller.unregister(conn.sock)
        self.reading.remove(conn)

    def murder_pending(self) -> None:
        """Also close the connections whose head has not arrived in time (all of them when stopping)."""
        super().murder_pending()
        now = time.monotonic()
        while self.reading and (self.reading[0].head_deadline <= now or not self.alive):
            conn = self.reading.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass
            self.nr_conns -= 1
            util.close(conn.sock)

    # ---- two pools ----
    def enqueue_req(self, conn: TConn) -> None:
        control = getattr(conn, "control", False)
        conn.control = False  # a pipelined request behind this one goes to the main pool
        pool = self.control_pool if control else self.tpool
        future = pool.submit(self.handle, conn)
        future.add_done_callback(lambda done: self.method_queue.defer(self.finish_request, conn, done))
