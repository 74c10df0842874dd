"""Requests-per-minute and tokens-per-minute limits for the LLM calls of one process.

A sliding 60-second window: a call waits until the window has room, or gives up when the wait
would outlast the request's deadline (the caller then fails that task instead of overrunning).
Limits are per worker process: with N gunicorn workers, set each limit to the provider's limit / N.
"""

from __future__ import annotations

import threading
import time
from collections import deque

WINDOW = 60.0


class RateLimited(Exception):
    pass


class RateLimiter:
    def __init__(self, rpm: int | None = None, tpm: int | None = None, clock=time.monotonic, sleep=time.sleep):
        self.rpm = rpm
        self.tpm = tpm
        self._clock = clock
        self._sleep = sleep
        self._calls: deque[list[float]] = deque()  # [time, tokens]; tokens corrected after the answer
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _purge(self, now: float) -> None:
        while self._calls and self._calls[0][0] <= now - WINDOW:
            self._calls.popleft()

    def acquire(self, tokens: int, time_left: float | None = None) -> list[float] | None:
        """Wait for room for one call of about `tokens` tokens; returns a handle for `settle`."""
        if not self.enabled:
            return None
        while True:
            with self._lock:
                now = self._clock()
                self._purge(now)
                used = sum(entry[1] for entry in self._calls)
                rpm_ok = not self.rpm or len(self._calls) < self.rpm
                # a single call bigger than the whole budget still goes, alone in its window
                tpm_ok = not self.tpm or used + tokens <= self.tpm or not self._calls
                if rpm_ok and tpm_ok:
                    entry = [now, float(tokens)]
                    self._calls.append(entry)
                    return entry
                wait = self._calls[0][0] + WINDOW - now + 0.01
            if time_left is not None and wait > time_left:
                raise RateLimited(f"the rate limit leaves no room before the deadline ({wait:.1f} s needed)")
            self._sleep(wait)
            if time_left is not None:
                time_left -= wait

    def settle(self, handle: list[float] | None, actual_tokens: int) -> None:
        """Count what the call really used (the API's `usage`) instead of the estimate."""
        if handle is not None:
            with self._lock:
                handle[1] = float(actual_tokens)
