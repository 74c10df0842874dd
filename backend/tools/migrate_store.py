"""`llm-ner migrate-store`: copy a SQLite store into PostgreSQL (or any store into another), idempotently.

Each table is copied row by row with an upsert: a row the target lacks is added; where both stores
have a row, the newer one wins when the table has a time (examples by the annotation's updated_at,
projects, cached answers, jobs), else the target's is kept (it is the live one, and adding usage
totals twice would count them twice). Afterwards deleted annotations win over any example, and each
project's example-set fingerprint is recomputed from the rows the target now has (the XOR of their
digests, as the store keeps it), so model_version describes the merged set. A second run finds every
row present and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.infra.storage import Database
from backend.learning.store import fingerprint_of

BATCH = 1000  # rows read from the source and written to the target at a time


@dataclass(frozen=True)
class Table:
    name: str
    key: tuple[str, ...]
    newer: str | None = None  # the column saying which of two rows is newer; None: the target's row is kept


# in an order that keeps every reference valid (a job before its failures)
TABLES = (
    Table("projects", ("project_id",), "updated_at"),
    Table("project_values", ("project_id", "key")),
    Table("examples", ("project_id", "annotation_id", "from_name"), "updated_at"),
    Table("deleted_annotations", ("project_id", "annotation_id")),
    Table("drafts", ("project_id", "task_id", "from_name")),
    Table("llm_cache", ("key",), "created_at"),
    Table("llm_usage", ("project_id",)),
    Table("deliveries", ("project_id", "model_version", "task_id")),
    Table("jobs", ("id",), "heartbeat_at"),
    Table("job_failures", ("job_id", "task_id")),
)


def _upsert(table: Table, columns: list[str]) -> str:
    marks = ", ".join("?" * len(columns))
    head = f"INSERT INTO {table.name}({', '.join(columns)}) VALUES ({marks}) ON CONFLICT({', '.join(table.key)}) DO "
    if table.newer is None:
        return head + "NOTHING"
    sets = ", ".join(f"{c}=excluded.{c}" for c in columns if c not in table.key)
    return head + f"UPDATE SET {sets} WHERE {table.name}.{table.newer} < excluded.{table.newer}"


def copy_store(source: Database, target: Database) -> dict[str, tuple[int, int]]:
    """Copy every table of `source` into `target`: {table: (rows in source, rows added or replaced
    in target)}, plus "example_sets": (projects, fingerprints changed)."""
    counts: dict[str, tuple[int, int]] = {}
    with source.reading() as read, target.transaction() as write:
        for table in TABLES:
            cursor = read.execute(f"SELECT * FROM {table.name}")
            columns = [d[0] for d in cursor.description]
            sql = _upsert(table, columns)
            seen = changed = 0
            while rows := cursor.fetchmany(BATCH):
                seen += len(rows)
                changed += max(0, write.executemany(sql, [tuple(row) for row in rows]).rowcount)
            counts[table.name] = (seen, changed)
        # a deleted annotation never comes back, whichever store saw the deletion
        write.execute(
            "DELETE FROM examples WHERE EXISTS (SELECT 1 FROM deleted_annotations d WHERE "
            "d.project_id = examples.project_id AND d.annotation_id = examples.annotation_id)"
        )
        projects = {r[0] for r in write.execute("SELECT DISTINCT project_id FROM examples").fetchall()}
        projects |= {r[0] for r in write.execute("SELECT project_id FROM example_sets").fetchall()}
        projects |= {r[0] for r in read.execute("SELECT project_id FROM example_sets").fetchall()}
        changed = 0
        for project in sorted(projects):
            digests = [r[0] for r in write.execute("SELECT digest FROM examples WHERE project_id=?", (project,)).fetchall()]
            fingerprint = fingerprint_of(digests)
            old = write.execute("SELECT fingerprint FROM example_sets WHERE project_id=?", (project,)).fetchone()
            if old is not None and old[0] == fingerprint:
                continue
            write.execute(
                "INSERT INTO example_sets(project_id, fingerprint) VALUES (?, ?) "
                "ON CONFLICT(project_id) DO UPDATE SET fingerprint=excluded.fingerprint",
                (project, fingerprint),
            )
            changed += 1
        counts["example_sets"] = (len(projects), changed)
    return counts
