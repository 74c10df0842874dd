"""SQLite under MODEL_DIR: the state every gunicorn worker and process shares.

One file, WAL mode, one connection per thread. Nothing is cached per process, so a change made by
one worker is seen by the next request on any other worker.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

DB_NAME = "backend.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    project_id TEXT PRIMARY KEY,
    label_config TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS project_values (
    project_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (project_id, key)
);
"""


class Database:
    """A SQLite file shared by processes; `extra_schema` lets each store add its own tables."""

    def __init__(self, path: Path, extra_schema: tuple[str, ...] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self.connection()
        for script in (SCHEMA, *extra_schema):
            conn.executescript(script)  # CREATE ... IF NOT EXISTS: safe for every process to run

    @classmethod
    def in_dir(cls, model_dir: Path, extra_schema: tuple[str, ...] = ()) -> "Database":
        return cls(Path(model_dir) / DB_NAME, extra_schema)

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN ourselves, so writes are explicit transactions
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: take the write lock up front so concurrent writers queue, not deadlock."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        return self.connection().execute(sql, params).fetchall()

    # ---- project state ----
    def save_label_config(self, project_id: str, label_config: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO projects(project_id, label_config, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(project_id) DO UPDATE SET label_config=excluded.label_config, "
                "updated_at=excluded.updated_at WHERE projects.label_config != excluded.label_config",
                (project_id, label_config, time.time()),
            )

    def label_config(self, project_id: str) -> str | None:
        rows = self.query("SELECT label_config FROM projects WHERE project_id=?", (project_id,))
        return rows[0]["label_config"] if rows else None

    def get_value(self, project_id: str, key: str) -> Any:
        rows = self.query("SELECT value FROM project_values WHERE project_id=? AND key=?", (project_id, key))
        return json.loads(rows[0]["value"]) if rows else None

    def set_value(self, project_id: str, key: str, value: Any) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO project_values(project_id, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT(project_id, key) DO UPDATE SET value=excluded.value",
                (project_id, key, json.dumps(value)),
            )
