"""An LLM call over within its timeout in all: connecting, sending, the answer's headers and body.

httpx's timeouts are per read: a provider that trickles its answer a byte at a time (or its headers
a line at a time) kept a call, and its thread, for as long as it liked, past the /predict deadline,
and such threads piled up. Here every read and write of a call's connection waits at most what is
left of the call's own timeout (`call_deadline`), so the call ends when that runs out.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpcore2
import httpx2
import openai

from backend.infra.deadline import CANCEL_LOOK, cancelled, watching_cancel

log = logging.getLogger(__name__)

# the end of the LLM call under way (a ContextVar of its own: infra/deadline.py's is the request's)
_call_end: contextvars.ContextVar[float | None] = contextvars.ContextVar("llm_call_end", default=None)


@contextmanager
def call_deadline(seconds: float) -> Iterator[None]:
    """The reads and writes of the calls made in this block end `seconds` from now, all together."""
    token = _call_end.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _call_end.reset(token)


def _capped(timeout: float | None, error: type[Exception]) -> float | None:
    deadline = _call_end.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the LLM call took longer than its timeout in all")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore2.NetworkStream):
    def __init__(self, stream: httpcore2.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if not watching_cancel():
            return self._stream.read(max_bytes, _capped(timeout, httpcore2.ReadTimeout))
        # a job's call: waited for in steps, so a cancel abandons it (the connection closes, a server
        # that stops on disconnect stops generating) within CANCEL_LOOK seconds, not at its timeout
        ends = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _capped(None if ends is None else ends - time.monotonic(), httpcore2.ReadTimeout)
            step = CANCEL_LOOK if left is None else min(left, CANCEL_LOOK)
            try:
                return self._stream.read(max_bytes, step)
            except httpcore2.ReadTimeout:
                if cancelled():
                    raise httpcore2.ReadError("abandoned: its job was cancelled") from None
                if left is not None and left <= CANCEL_LOOK:
                    raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _capped(timeout, httpcore2.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> _DeadlineStream:
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, _capped(timeout, httpcore2.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore2.NetworkBackend):
    def __init__(self, backend: httpcore2.NetworkBackend):
        self._backend = backend

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore2.NetworkStream:
        timeout = _capped(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> httpcore2.NetworkStream:
        timeout = _capped(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def http_client(timeout: float) -> httpx2.Client:
    """The openai client's HTTP client (its defaults), whose connections keep to `call_deadline`."""
    transport = httpx2.HTTPTransport(limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=100))
    pool = getattr(transport, "_pool", None)
    if hasattr(pool, "_network_backend"):
        pool._network_backend = _DeadlineBackend(pool._network_backend)
    else:  # another httpx2: calls are then bounded per read only
        log.warning("this httpx2 has no connection pool to wrap: LLM_TIMEOUT bounds each read, not the whole call")
    return openai.DefaultHttpxClient(transport=transport, timeout=timeout)
