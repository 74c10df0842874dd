"""The persistent response cache: what the LLM answered for a request, in SQLite under MODEL_DIR.

Keyed by a hash of everything that determines the answer (model_version, model, the rendered
messages with their few-shot examples and the text, the response schema, sampling settings), so
re-predicting an unchanged task makes no LLM call, in any worker, after a restart too; and any
change to the prompt, the examples, the label config or the model misses and asks again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backend.infra import metrics
from backend.infra.storage import STORE_ERRORS, Database

log = logging.getLogger(__name__)

PRUNE_EVERY = 500  # puts between two size checks: a COUNT(*) per write would cost more than the write
FLUSH_EVERY = 32  # answers kept in memory before they are written in one transaction


def cache_key(messages: Sequence[dict[str, str]] = (), **parts: Any) -> str:
    """sha256 of the settings (sorted JSON) and the messages. Each message field is hashed as it is
    behind its name and length (so no two prompts share a key): JSON-encoding 14 kB of prompt first
    cost four times as much as hashing it."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    for message in messages:
        for name in sorted(message):
            value = str(message[name]).encode("utf-8")
            digest.update(b"%s=%d:" % (name.encode("utf-8"), len(value)))
            digest.update(value)
        digest.update(b";")
    return digest.hexdigest()


class ResponseCache:
    """Answers are written in batches: `put` keeps them in memory (where `get` finds them at once) and
    every FLUSH_EVERY answers, or at `flush()` (the end of each /predict), they go to SQLite in one
    transaction, as a transaction per answer cost more than the rest of the cache's work; what a
    killed worker loses is at most a batch of answers that will simply be asked again."""

    def __init__(self, db: Database, max_rows: int = 200_000):
        self.db = db
        self.max_rows = max_rows
        self._puts = 0
        self._pending: dict[str, tuple[str, float]] = {}  # key -> (answer JSON, time of put)
        self._writing: list[dict[str, tuple[str, float]]] = []  # batches being written: still readable
        self._lock = threading.Lock()

    @classmethod
    def in_dir(cls, model_dir: Path, max_rows: int = 200_000) -> ResponseCache:
        """A cache on its own connection to MODEL_DIR's store (tools and tests; the server's is in Services)."""
        return cls(Database.in_dir(model_dir), max_rows)

    def _unwritten(self, key: str) -> tuple[str, float] | None:
        with self._lock:
            for batch in (self._pending, *self._writing):
                if key in batch:
                    return batch[key]
        return None

    def get(self, key: str) -> dict[str, Any] | None:
        unwritten = self._unwritten(key)
        if unwritten is not None:
            metrics.CACHE_HITS.inc()
            return json.loads(unwritten[0])
        rows = self.db.query("SELECT value FROM llm_cache WHERE key=?", (key,))
        (metrics.CACHE_HITS if rows else metrics.CACHE_MISSES).inc()
        return json.loads(rows[0]["value"]) if rows else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._pending[key] = (json.dumps(value, ensure_ascii=False), time.time())
            full = len(self._pending) >= FLUSH_EVERY
        if full:
            self.flush()

    def flush(self) -> None:
        """Write the answers kept since the last flush (every worker and process sees them after).
        A failed write is logged and dropped: losing cached answers must never fail a request."""
        with self._lock:
            batch = self._pending
            if not batch:
                return
            self._pending = {}
            self._writing.append(batch)
        try:
            with self.db.transaction(durable=False) as conn:
                conn.executemany(
                    "INSERT INTO llm_cache(key, value, created_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value=excluded.value, created_at=excluded.created_at",
                    [(key, value, at) for key, (value, at) in batch.items()],
                )
            before, self._puts = self._puts, self._puts + len(batch)
            if self._puts // PRUNE_EVERY != before // PRUNE_EVERY:
                self.prune()
        except STORE_ERRORS as error:
            metrics.STORE_WRITES_LOST.labels("cache").inc()
            log.warning("response cache: %d answers not written (%s); they will be asked again", len(batch), error)
        finally:
            with self._lock:
                self._writing = [b for b in self._writing if b is not batch]

    def prune(self) -> int:
        """Drop the oldest answers beyond `max_rows` (answers of old model versions are never read again)."""
        with self.db.transaction() as conn:
            excess = conn.execute("SELECT COUNT(*) FROM llm_cache").fetchone()[0] - self.max_rows
            if excess <= 0:
                return 0
            conn.execute(
                "DELETE FROM llm_cache WHERE key IN (SELECT key FROM llm_cache ORDER BY created_at LIMIT ?)", (excess,)
            )
        return excess

    def __len__(self) -> int:
        self.flush()
        return self.db.query("SELECT COUNT(*) AS n FROM llm_cache")[0]["n"]
