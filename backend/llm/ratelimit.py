"""Requests-per-minute and tokens-per-minute limits for the LLM calls of one process, and the
number of calls in flight at once (ConcurrencyGate).

A sliding 60-second window: a call waits until the window has room, or gives up when the wait
would outlast the request's deadline (the caller then fails that task instead of overrunning).
Without Redis, limits are per worker process: with N gunicorn workers, set each limit to the
provider's limit / N. With REDIS_URL, SharedRateLimiter holds one budget for every process and host.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable

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


class GateTimeout(Exception):
    pass


class ConcurrencyGate:
    """How many LLM calls of this process may be in flight at once, adapting to what the endpoint sustains.

    At most `ceiling` (PREDICT_CONCURRENCY, or the probe's figure); halved when a call shows the
    endpoint is saturated (a timeout, a 429/503, an answer slower than half the timeout: requests
    queued on the server), raised one step after `limit` calls in a row went well. Only calls started
    after the last change move the limit again, so one burst of timeouts halves it once, not to 1.
    A call waits here, before its HTTP timeout starts: queueing never eats into a request's own timeout.
    """

    def __init__(self, ceiling: int, on_change: Callable[[int, str], None] | None = None, clock=time.monotonic):
        self.ceiling = max(1, ceiling)
        self.limit = self.ceiling
        self.in_flight = 0
        self._clock = clock
        self._on_change = on_change
        self._changed_at = clock()
        self._good = 0
        self._cond = threading.Condition()

    def reset(self, ceiling: int) -> None:
        """A new ceiling (the probe measured the endpoint): the limit starts there."""
        with self._cond:
            self.ceiling = self.limit = max(1, ceiling)
            self._changed_at, self._good = self._clock(), 0
            self._cond.notify_all()

    def acquire(self, time_left: float | None = None) -> float:
        """Wait for a free slot (at most `time_left` seconds); returns the call's start, for `release`."""
        with self._cond:
            if self.in_flight >= self.limit:
                end = None if time_left is None else self._clock() + time_left
                while self.in_flight >= self.limit:
                    remaining = None if end is None else end - self._clock()
                    if remaining is not None and remaining <= 0:
                        raise GateTimeout(
                            f"{self.in_flight} LLM calls were in flight (the limit is {self.limit}) until the deadline"
                        )
                    self._cond.wait(remaining)
            self.in_flight += 1
            return self._clock()

    def release(self, started: float, congested: bool) -> None:
        with self._cond:
            self.in_flight -= 1
            change = None
            if started >= self._changed_at:
                if congested:
                    self._good = 0
                    if self.limit > 1:
                        self.limit = max(1, self.limit // 2)
                        change = "lowered"
                else:
                    self._good += 1
                    if self._good >= self.limit and self.limit < self.ceiling:
                        self.limit += 1
                        change = "raised"
                if change:
                    self._changed_at, self._good = self._clock(), 0
            free = self.limit - self.in_flight
            if free > 0:
                self._cond.notify(free)
            limit = self.limit
        if change and self._on_change is not None:
            self._on_change(limit, change)


class SharedRateLimiter:
    """LLM_RPM and LLM_TPM shared by every process and host on one Redis (REDIS_URL), through the
    `limits` library: requests in an exact moving window (a log of the last minute's calls, kept
    in Redis by an atomic script), tokens in a sliding-window counter (two counters per key: a log
    of every token would be as long as the limit). The same interface as RateLimiter."""

    POLL = 1.0  # seconds between two looks at a full window

    def __init__(self, redis_url: str, provider: str, rpm: int | None = None, tpm: int | None = None,
                 clock=time.time, sleep=time.sleep):
        from limits import RateLimitItemPerMinute
        from limits.storage import RedisStorage
        from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

        if redis_url.startswith("unix://"):
            redis_url = "redis+unix://" + redis_url[len("unix://"):]
        storage = RedisStorage(redis_url)
        self.rpm, self.tpm = rpm, tpm
        self._clock, self._sleep = clock, sleep
        self._key = "llm-ner-" + hashlib.sha256(provider.encode()).hexdigest()[:16]  # one budget per endpoint and model
        self._requests = MovingWindowRateLimiter(storage)
        self._tokens = SlidingWindowCounterRateLimiter(storage)
        self._rpm_item = RateLimitItemPerMinute(rpm) if rpm else None
        self._tpm_item = RateLimitItemPerMinute(tpm) if tpm else None

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def acquire(self, tokens: int, time_left: float | None = None) -> list[float] | None:
        """Wait for room for one call of about `tokens` tokens in the shared window; returns a handle for `settle`."""
        if not self.enabled:
            return None
        # a single call bigger than the whole budget still goes, as in RateLimiter
        cost = min(max(1, int(tokens)), self.tpm) if self.tpm else 0
        while True:
            requests_ok = self._rpm_item is None or self._requests.test(self._rpm_item, self._key)
            tokens_ok = self._tpm_item is None or self._tokens.test(self._tpm_item, self._key, cost=cost)
            # each hit is atomic in Redis: a process that took the room since the test makes this one wait
            if requests_ok and tokens_ok and (self._rpm_item is None or self._requests.hit(self._rpm_item, self._key)):
                if self._tpm_item is None or self._tokens.hit(self._tpm_item, self._key, cost=cost):
                    return [self._clock(), float(cost)]
            resets = []
            if self._rpm_item is not None:
                resets.append(self._requests.get_window_stats(self._rpm_item, self._key).reset_time)
            if self._tpm_item is not None and not tokens_ok:
                resets.append(self._tokens.get_window_stats(self._tpm_item, self._key).reset_time)
            needed = max(0.0, max(resets) - self._clock()) if resets else self.POLL
            if time_left is not None and needed > time_left:
                raise RateLimited(f"the shared rate limit leaves no room before the deadline ({needed:.1f} s needed)")
            wait = min(max(needed, 0.05), self.POLL)
            self._sleep(wait)
            if time_left is not None:
                time_left -= wait

    def settle(self, handle: list[float] | None, actual_tokens: int) -> None:
        """A call that used more tokens than estimated takes the difference too (when the window has it)."""
        if handle is not None and self._tpm_item is not None and actual_tokens > handle[1]:
            self._tokens.hit(self._tpm_item, self._key, cost=min(int(actual_tokens - handle[1]), self.tpm))
