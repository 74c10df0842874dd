"""The few-shot example store of one project, in the shared store (SQLite under MODEL_DIR, or PostgreSQL).

One row per (annotation, <Labels> target): the task text and the human's spans. A task's example is
its latest annotation (by the annotation's own `updated_at`, so webhooks arriving out of order still
leave the newest correction). Deleted annotation ids are remembered, so a late ANNOTATION_UPDATED
cannot bring one back.

The example set's fingerprint is an XOR of row digests kept in the same transaction as every change:
O(1) per write, and it changes whenever the set's content does (a row's digest leaves out its
`updated_at`: the same correction sent again with a later time changes nothing). Every worker
reads it from the store on each use; the per-process BM25 index is keyed by it (or by the version
the model publishes from it), so it is rebuilt, never stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from backend.infra import metrics
from backend.infra.storage import STORE_ERRORS, Database
from backend.learning.selection import ExampleIndex, token_cost
from backend.ner.labelconfig import NerSchema, NerTarget
from backend.ner.mentions import FewShotExample
from backend.spans.alignment import Span

log = logging.getLogger(__name__)

EMPTY = "0" * 32
# SQLite allows at most 32766 variables in one statement: id lists are sent in slices
ID_SLICE = 500
INSERT = (
    "INSERT INTO examples(project_id, annotation_id, from_name, task_id, text, spans, draft, updated_at, digest, "
    "stored_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(project_id, annotation_id, from_name) DO UPDATE SET "
    "task_id=excluded.task_id, text=excluded.text, spans=excluded.spans, draft=excluded.draft, "
    "updated_at=excluded.updated_at, digest=excluded.digest, stored_at=excluded.stored_at"
)


@dataclass(frozen=True)
class StoredExample:
    """A task's current example for one target, with the LLM's draft when one was recorded.
    `from_name` is the target's key (`NerTarget.key`: the <Labels> name, unless it serves several texts)."""

    task_id: int
    annotation_id: int
    from_name: str
    text: str
    spans: tuple[Span, ...]
    draft: tuple[Span, ...] | None
    updated_at: float

    def few_shot(self) -> FewShotExample:
        return FewShotExample(
            self.text, tuple((s.text, s.label) for s in self.spans), self.task_id, self.annotation_id, self.rejected(),
            tuple(s.start for s in self.spans),
        )

    def rejected(self) -> tuple[tuple[str, str], ...]:
        """Draft spans the annotator deleted (no corrected span at the same place, whatever its label)."""
        kept = {(s.start, s.end) for s in self.spans}
        return tuple(dict.fromkeys((s.text, s.label) for s in self.draft or () if (s.start, s.end) not in kept))


def timestamp(value: object) -> float:
    """An annotation's `updated_at` (ISO 8601 from Label Studio, or epoch seconds); now if absent."""
    if isinstance(value, datetime):  # what the SDK gives
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.strip():
        try:
            return datetime.fromisoformat(value.strip().replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return time.time()


def _spans_json(spans: Iterable[Span]) -> str:
    return json.dumps(sorted([s.start, s.end, s.text, s.label] for s in spans), ensure_ascii=False)


def _spans(value: str | None) -> tuple[Span, ...] | None:
    if value is None:
        return None
    return tuple(Span(int(a), int(b), str(t), str(l)) for a, b, t, l in json.loads(value))


def _digest(annotation_id: int, from_name: str, task_id: int, text: str, spans: str) -> str:
    # not the row's updated_at: re-sending one correction with ever later times must not change
    # the fingerprint (and with it model_version, which makes Label Studio pay the LLM again)
    payload = json.dumps([annotation_id, from_name, task_id, text, spans], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def _known_only(example: FewShotExample, known: frozenset[str]) -> FewShotExample:
    """The example without the entities of labels the current config no longer has."""
    keep = [i for i, (_, label) in enumerate(example.entities) if label in known]
    starts = tuple(example.starts[i] for i in keep) if example.starts else ()
    return replace(example, entities=tuple(example.entities[i] for i in keep), starts=starts)
def _slices(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    return (ids[i : i + ID_SLICE] for i in range(0, len(ids), ID_SLICE))


def fingerprint_of(digests: Iterable[str]) -> str:
    """The fingerprint of an example set made of rows with these digests."""
    return _xor(*digests)


def _xor(*digests: str) -> str:
    """The XOR of row digests: adding a row and taking it out are the same operation."""
    value = 0
    for digest in digests:
        value ^= int(digest, 16)
    return format(value, "032x")


class IndexCache:
    """A process's BM25 indexes, per project: (fingerprint, {from_name: index}), valid only while
    the fingerprint in the store is the same. One per process, held by Services."""

    def __init__(self) -> None:
        self._indexes: dict[str, tuple[str, dict[str, ExampleIndex]]] = {}
        self._lock = threading.Lock()

    def get(self, project_id: str, fingerprint: str) -> dict[str, ExampleIndex] | None:
        with self._lock:
            cached = self._indexes.get(project_id)
        return cached[1] if cached is not None and cached[0] == fingerprint else None

    def put(self, project_id: str, fingerprint: str, indexes: dict[str, ExampleIndex]) -> None:
        with self._lock:
            self._indexes[project_id] = (fingerprint, indexes)


class ExampleStore:
    def __init__(self, db: Database, project_id: str, indexes: IndexCache | None = None):
        self.db = db
        self.project_id = str(project_id)
        self._indexes = indexes or IndexCache()

    # ---- reading ----
    def fingerprint(self) -> str:
        rows = self.db.query("SELECT fingerprint FROM example_sets WHERE project_id=?", (self.project_id,))
        return rows[0]["fingerprint"] if rows else EMPTY

    def _rows(self, conn, max_chars: int | None = None) -> list[Any]:
        # texts longer than max_chars come back as NULL: the caller has no use for them, and
        # reading them into Python would cost what they are long
        text = "text" if max_chars is None else f"CASE WHEN length(text) <= {int(max_chars)} THEN text END AS text"
        return conn.execute(
            f"SELECT task_id, annotation_id, from_name, {text}, spans, draft, updated_at FROM examples "
            "WHERE project_id=? ORDER BY task_id, from_name, updated_at, annotation_id",
            (self.project_id,),
        ).fetchall()

    @staticmethod
    def _latest(rows: Sequence[Any]) -> list[StoredExample]:
        latest: dict[tuple[int, str], Any] = {}
        for row in rows:  # ordered oldest first within a (task, target): the last one wins
            latest[(row["task_id"], row["from_name"])] = row
        return [
            StoredExample(
                row["task_id"], row["annotation_id"], row["from_name"], row["text"],
                _spans(row["spans"]) or (), _spans(row["draft"]), row["updated_at"],
            )
            for row in latest.values()
            if row["text"] is not None
        ]

    def snapshot(self, max_chars: int | None = None) -> tuple[str, list[StoredExample]]:
        """The fingerprint and the current examples (those of at most `max_chars` characters when
        given), read in one transaction so they agree."""
        with self.db.reading() as conn:
            fingerprint = self.fingerprint()
            rows = self._rows(conn, max_chars)
        return fingerprint, self._latest(rows)

    def examples(self) -> list[StoredExample]:
        return self.snapshot()[1]

    def count(self) -> int:
        """How many examples there are (one per task and target), without reading them."""
        rows = self.db.query(
            "SELECT COUNT(*) AS n FROM (SELECT DISTINCT task_id, from_name FROM examples WHERE project_id=?) AS targets",
            (self.project_id,),
        )
        return int(rows[0]["n"])

    def known(self, annotation_ids: Iterable[int]) -> dict[int, int]:
        """annotation id -> task id, for those of these annotations that have example rows."""
        ids = sorted({int(i) for i in annotation_ids})
        found: dict[int, int] = {}
        for part in _slices(ids):
            rows = self.db.query(
                "SELECT DISTINCT annotation_id, task_id FROM examples WHERE project_id=? "
                f"AND annotation_id IN ({','.join('?' * len(part))})",
                (self.project_id, *part),
            )
            found.update((r["annotation_id"], r["task_id"]) for r in rows)
        return found

    def annotation_rows(self) -> list[tuple[int, str, int]]:
        """(annotation_id, from_name, task_id) of every stored row: for checking there are no duplicates."""
        rows = self.db.query(
            "SELECT annotation_id, from_name, task_id FROM examples WHERE project_id=? ORDER BY annotation_id",
            (self.project_id,),
        )
        return [(r["annotation_id"], r["from_name"], r["task_id"]) for r in rows]

    def indexes(self, key: str | None = None, token_budget: int | None = None) -> dict[str, ExampleIndex]:
        """The BM25 index of each target's examples, kept per process while `key` (by default the
        fingerprint) is the same. With a `token_budget`, examples that could never fit it are left out."""
        key = self.fingerprint() if key is None else key
        cached = self._indexes.get(self.project_id, key)
        if cached is not None:
            return cached
        # an example costs at least a token per 4 characters of its text (selection.token_cost)
        _, examples = self.snapshot(None if token_budget is None else 4 * token_budget)
        by_target: dict[str, list[FewShotExample]] = {}
        for example in sorted(examples, key=lambda e: e.task_id):
            shot = example.few_shot()
            if token_budget is None or token_cost(shot) <= token_budget:
                by_target.setdefault(example.from_name, []).append(shot)
        indexes = {name: ExampleIndex(items) for name, items in by_target.items()}
        self._indexes.put(self.project_id, key, indexes)
        return indexes

    def selector(self, k: int, token_budget: int, key: str | None = None):
        """The `select_examples(target, text)` callable for one /predict: one index lookup per request,
        made at the first selection, so that building an index runs under the request's deadline."""
        lock = threading.Lock()
        loaded: list[dict[str, ExampleIndex]] = []

        def indexes() -> dict[str, ExampleIndex]:
            with lock:
                if not loaded:
                    loaded.append(self.indexes(key, token_budget) if k > 0 else {})
                return loaded[0]

        def select(target: NerTarget, text: str) -> list[FewShotExample]:
            index = indexes().get(target.key)
            if index is None:
                return []
            known = target.label_set
            chosen = index.select(text, target.label_names, k, token_budget)
            # examples made under an older label config may carry labels this one no longer has
            return [e if e.labels <= known else _known_only(e, known) for e in chosen]

        return select

    # ---- writing ----
    def _set_fingerprint(self, conn, fingerprint: str) -> None:
        conn.execute(
            "INSERT INTO example_sets(project_id, fingerprint) VALUES (?, ?) ON CONFLICT(project_id) DO UPDATE SET "
            "fingerprint=excluded.fingerprint",
            (self.project_id, fingerprint),
        )

    def upsert_annotation(
        self, annotation_id: int, task_id: int, updated_at: float, targets: dict[str, tuple[str, Sequence[Span]]],
        limit: int | None = None, max_chars: int | None = None,
    ) -> str:
        """Store (or replace) one annotation's example rows: `targets` maps from_name -> (text, spans).

        Returns "stored", "unchanged", "stale" (a newer version is already stored), "deleted", or
        "full" (a new annotation while `limit` annotations are stored already, or one whose texts
        would take the project's example texts past `max_chars` characters).
        """
        with self.db.transaction() as conn:
            if conn.execute(
                "SELECT 1 FROM deleted_annotations WHERE project_id=? AND annotation_id=?", (self.project_id, annotation_id)
            ).fetchone():
                return "deleted"
            old = conn.execute(
                "SELECT from_name, updated_at, digest, draft FROM examples WHERE project_id=? AND annotation_id=?",
                (self.project_id, annotation_id),
            ).fetchall()
            if old and max(r["updated_at"] for r in old) > updated_at:
                return "stale"
            if not old and limit is not None:
                stored = conn.execute(
                    "SELECT COUNT(DISTINCT annotation_id) FROM examples WHERE project_id=?", (self.project_id,)
                ).fetchone()[0]
                if stored >= limit:
                    return "full"
            if not old and max_chars is not None:
                # the texts of a project's examples, all of them: what its example index holds in each worker
                held = conn.execute(
                    "SELECT COALESCE(SUM(LENGTH(text)), 0) FROM examples WHERE project_id=?", (self.project_id,)
                ).fetchone()[0]
                if held + sum(len(text) for text, _ in targets.values()) > max_chars:
                    return "full"
            drafts = {r["from_name"]: r["draft"] for r in old}
            new_rows = []
            for from_name, (text, spans) in targets.items():
                spans_json = _spans_json(spans)
                draft = drafts.get(from_name) or self._draft(conn, task_id, from_name, text)
                digest = _digest(annotation_id, from_name, task_id, text, spans_json)
                new_rows.append((self.project_id, annotation_id, from_name, task_id, text, spans_json, draft, updated_at, digest, time.time()))
            change = _xor(*(r["digest"] for r in old), *(row[8] for row in new_rows))
            if change == EMPTY:
                # the same content: only its time moves on (no new fingerprint, no new model_version)
                conn.execute(
                    "UPDATE examples SET updated_at=? WHERE project_id=? AND annotation_id=?",
                    (updated_at, self.project_id, annotation_id),
                )
                return "unchanged"
            conn.execute("DELETE FROM examples WHERE project_id=? AND annotation_id=?", (self.project_id, annotation_id))
            conn.executemany(INSERT, new_rows)
            self._set_fingerprint(conn, _xor(self.fingerprint(), change))
            return "stored"

    def _draft(self, conn, task_id: int, from_name: str, text: str) -> str | None:
        row = conn.execute(
            "SELECT text, spans FROM drafts WHERE project_id=? AND task_id=? AND from_name=?",
            (self.project_id, task_id, from_name),
        ).fetchone()
        return row["spans"] if row is not None and row["text"] == text else None

    def delete_annotations(self, annotation_ids: Iterable[int]) -> int:
        """Remove the examples made from these annotations, and refuse them from now on. Returns rows removed."""
        ids = sorted({int(i) for i in annotation_ids})
        if not ids:
            return 0
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT INTO deleted_annotations(project_id, annotation_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(self.project_id, i) for i in ids],
            )
            return sum(self._remove(conn, part) for part in _slices(ids))

    def forget_annotation(self, annotation_id: int) -> int:
        """An annotation that became skipped/cancelled: no longer an example, but it may come back."""
        with self.db.transaction() as conn:
            return self._remove(conn, [annotation_id])

    def _remove(self, conn, annotation_ids: Sequence[int]) -> int:
        """Delete the examples of these annotations, taking their digests out of the fingerprint."""
        marks = ",".join("?" * len(annotation_ids))
        where = f"WHERE project_id=? AND annotation_id IN ({marks})"
        params = (self.project_id, *annotation_ids)
        old = conn.execute(f"SELECT digest FROM examples {where}", params).fetchall()
        if not old:
            return 0
        change = _xor(*(r["digest"] for r in old))
        conn.execute(f"DELETE FROM examples {where}", params)
        self._set_fingerprint(conn, _xor(self.fingerprint(), change))
        return len(old)

    def replace_all(
        self, annotations: Sequence[tuple[int, int, float, dict[str, tuple[str, Sequence[Span]]]]], started_at: float
    ) -> int:
        """START_TRAINING: the project's examples become these (annotation_id, task_id, updated_at, targets),
        read from Label Studio since `started_at`. Webhooks handled meanwhile are newer than that read:
        rows they stored and annotations they deleted win over it."""
        with self.db.transaction() as conn:
            existing = conn.execute("SELECT * FROM examples WHERE project_id=?", (self.project_id,)).fetchall()
            deleted = {
                r["annotation_id"]
                for r in conn.execute("SELECT annotation_id FROM deleted_annotations WHERE project_id=?", (self.project_id,))
            }
            drafts = {(r["annotation_id"], r["from_name"]): r["draft"] for r in existing}
            fresh = [r for r in existing if r["stored_at"] >= started_at]
            fresh_ids = {r["annotation_id"] for r in fresh}
            conn.execute("DELETE FROM examples WHERE project_id=? AND stored_at < ?", (self.project_id, started_at))
            digests = [r["digest"] for r in fresh]
            count = len(fresh)
            now = time.time()
            for annotation_id, task_id, updated_at, targets in annotations:
                if annotation_id in deleted or annotation_id in fresh_ids:
                    continue
                for from_name, (text, spans) in targets.items():
                    spans_json = _spans_json(spans)
                    draft = drafts.get((annotation_id, from_name)) or self._draft(conn, task_id, from_name, text)
                    digest = _digest(annotation_id, from_name, task_id, text, spans_json)
                    conn.execute(INSERT, (self.project_id, annotation_id, from_name, task_id, text, spans_json, draft, updated_at, digest, now))
                    digests.append(digest)
                    count += 1
            self._set_fingerprint(conn, _xor(*digests))
            return count

    def record_drafts(
        self, schema: NerSchema, tasks: Sequence[dict[str, Any]], results: Sequence[list[dict[str, Any]] | None], model_version: str
    ) -> None:
        """Keep what the LLM proposed for each task, so a later correction can be paired with it."""
        rows = []
        for task, result in zip(tasks, results):
            task_id, data = task.get("id"), task.get("data") or {}
            if result is None or not isinstance(task_id, int):
                continue
            for target in schema.targets:
                text = data.get(target.data_key)
                if not isinstance(text, str):
                    continue
                spans = [
                    Span(v["start"], v["end"], v["text"], v["labels"][0])
                    for r in result
                    if target.owns(r) and (v := r.get("value") or {}).get("labels")
                ]
                rows.append((self.project_id, task_id, target.key, text, _spans_json(spans), model_version))
        if not rows:
            return
        try:
            self._write_drafts(rows)
        except STORE_ERRORS as error:
            # drafts serve the preference export later: a store that cannot be written loses them, not the answer
            metrics.STORE_WRITES_LOST.labels("drafts").inc()
            log.warning("project %s: LLM drafts not recorded: %s", self.project_id, error)

    def _write_drafts(self, rows: list[tuple]) -> None:
        with self.db.transaction(durable=False) as conn:
            conn.executemany(
                "INSERT INTO drafts(project_id, task_id, from_name, text, spans, model_version) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(project_id, task_id, from_name) DO UPDATE SET "
                "text=excluded.text, spans=excluded.spans, model_version=excluded.model_version",
                rows,
            )
