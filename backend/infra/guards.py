"""Guards against running the same background work twice in one process (held by Services)."""

from __future__ import annotations

import threading


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
