"""Guards against running the same background work twice in one process (held by Services)."""

from __future__ import annotations

import threading
import time


class OnePerKey:
    """At most one piece of work per key at a time: a second claim while the first runs is refused."""

    def __init__(self) -> None:
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, key: str) -> bool:
        with self._lock:
            if key in self._keys:
                return False
            self._keys.add(key)
            return True

    def release(self, key: str) -> None:
        with self._lock:
            self._keys.discard(key)


class ByteBudget:
    """Bytes of request bodies a process reads and works on at once: a body waits (up to `wait`
    seconds) until the bodies before it are done, so that however many arrive together, one worker
    holds at most `total` bytes of them (and what parsing them makes)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._changed = threading.Condition()

    def take(self, size: int, wait: float) -> bool:
        size = min(size, self.total)  # a body the size of the whole budget waits for all others
        deadline = time.monotonic() + wait
        with self._changed:
            while self.used + size > self.total:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            self.used += size
            return True

    def give_back(self, size: int) -> None:
        with self._changed:
            self.used -= min(size, self.total)
            self._changed.notify_all()
