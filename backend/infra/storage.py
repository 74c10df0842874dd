"""SQLite under MODEL_DIR: the state every gunicorn worker and process shares.

One file, WAL mode, one connection per thread. Nothing is cached per process, so a change made by
one worker is seen by the next request on any other worker.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from backend.infra.errors import BackendError

DB_NAME = "backend.sqlite3"
# less free space than this under MODEL_DIR and the store is as good as full: say so before writes fail
MIN_FREE_BYTES = 1 << 20
HEALTH_EVERY = 5.0  # seconds a store check stays valid for /health (Label Studio calls it often)
FAILURE_MEMORY = 60.0  # seconds a failed write keeps the store reported as failing, unless one succeeds


def store_state(error: sqlite3.Error) -> str:
    """What a SQLite error says about the store: full, read-only, corrupt, busy or failing (I/O)."""
    name = getattr(error, "sqlite_errorname", "") or ""
    text = str(error).lower()
    if name == "SQLITE_FULL" or "disk is full" in text:
        return "full"
    if name.startswith("SQLITE_READONLY") or "readonly" in text:
        return "read-only"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a database" in text:
        return "corrupt"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return "busy"
    return "failing"


class StoreUnavailable(BackendError):
    """The store under MODEL_DIR cannot be used: what went wrong, in words that name the file."""

    def __init__(self, path: Path, error: BaseException):
        self.state = store_state(error) if isinstance(error, sqlite3.Error) else "failing"
        advice = {
            "full": "free some space under MODEL_DIR",
            "read-only": "make MODEL_DIR and the file writable by the backend",
            "corrupt": "restore it from a backup, or move it away to start with an empty store",
            "busy": "another process holds its write lock; try again",
        }.get(self.state, "check the disk under MODEL_DIR")
        detail = " ".join(str(error).split())[:300]  # one line: quick_check reports over several
        super().__init__(f"the store {path} is {self.state} ({detail}): {advice}")

# The schema registry: every table of every store, in one place. Each entry is one version of the
# schema, applied once and in order (SQLite's user_version counts them); a change is a new entry,
# never an edit of an old one. Entry 1 says IF NOT EXISTS because stores made before versioning
# already hold its tables.
MIGRATIONS: tuple[str, ...] = (
    """
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

CREATE TABLE IF NOT EXISTS examples (
    project_id TEXT NOT NULL,
    annotation_id INTEGER NOT NULL,
    from_name TEXT NOT NULL,
    task_id INTEGER NOT NULL,
    text TEXT NOT NULL,
    spans TEXT NOT NULL,
    draft TEXT,
    updated_at REAL NOT NULL,
    digest TEXT NOT NULL,
    stored_at REAL NOT NULL,
    PRIMARY KEY (project_id, annotation_id, from_name)
);
CREATE INDEX IF NOT EXISTS examples_by_task ON examples(project_id, task_id, from_name);
CREATE TABLE IF NOT EXISTS deleted_annotations (
    project_id TEXT NOT NULL,
    annotation_id INTEGER NOT NULL,
    PRIMARY KEY (project_id, annotation_id)
);
CREATE TABLE IF NOT EXISTS drafts (
    project_id TEXT NOT NULL,
    task_id INTEGER NOT NULL,
    from_name TEXT NOT NULL,
    text TEXT NOT NULL,
    spans TEXT NOT NULL,
    model_version TEXT NOT NULL,
    PRIMARY KEY (project_id, task_id, from_name)
);
CREATE TABLE IF NOT EXISTS example_sets (
    project_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS llm_cache (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS llm_cache_age ON llm_cache(created_at);

CREATE TABLE IF NOT EXISTS llm_usage (
    project_id TEXT PRIMARY KEY,
    tasks INTEGER NOT NULL DEFAULT 0,
    calls INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0
);
""",
    """
-- pipeline/delivery.py: which (task, model_version) pre-labels were delivered to Label Studio, and by whom first
CREATE TABLE deliveries (
    project_id TEXT NOT NULL,
    task_id INTEGER NOT NULL,
    model_version TEXT NOT NULL,
    delivered_at REAL NOT NULL,
    PRIMARY KEY (project_id, model_version, task_id)
);
""",
    """
-- pipeline/jobs.py: project jobs (pre-label a whole project), their progress and the tasks that failed
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    spec TEXT NOT NULL,
    model_version TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    total INTEGER,
    seen INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    calls INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE job_failures (
    job_id TEXT NOT NULL,
    task_id INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job_id, task_id)
);
""",
)


class Database:
    """A SQLite file shared by processes, at the newest schema version. Make one per process
    (`protocol/services.py` does): it keeps a connection per thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._failure: tuple[float, str, str] | None = None  # (monotonic time, state, message) of the last failed write
        self._health: tuple[float, dict[str, Any]] | None = None
        self.migrate()

    def check(self) -> None:
        """At start, before any worker: the whole file is read (PRAGMA quick_check); a damaged store
        raises StoreUnavailable naming it, instead of every worker failing to boot."""
        try:
            self.migrate()
            (result,) = self.connection().execute("PRAGMA quick_check(1)").fetchone()
        except sqlite3.Error as error:
            raise StoreUnavailable(self.path, error) from None
        if result != "ok":
            raise StoreUnavailable(self.path, sqlite3.DatabaseError(f"database disk image is malformed: {result}"))

    def note_failure(self, error: sqlite3.Error) -> None:
        """A write or read failed: /health reports the store as failing for a while (until a write succeeds)."""
        self._failure = (time.monotonic(), store_state(error), str(error))
        self._health = None

    def health(self) -> dict[str, Any]:
        """The store's state for /health: {"state": ok | busy | full | read-only | corrupt | failing,
        "path", "detail"?}. Free space, a read and a small write on a connection of its own (never
        waiting on another writer for more than 0.2 s), and this process's last failure; cached a few seconds."""
        now = time.monotonic()
        if self._health is not None and now - self._health[0] < HEALTH_EVERY:
            return self._health[1]
        state, detail = "ok", None
        try:
            free = shutil.disk_usage(self.path.parent).free
            if free < MIN_FREE_BYTES:
                state, detail = "full", f"{free} bytes free under {self.path.parent}"
        except OSError as error:
            state, detail = "failing", str(error)
        if state == "ok":
            try:
                conn = sqlite3.connect(self.path, timeout=0.2, isolation_level=None)
                try:
                    conn.execute("SELECT count(*) FROM project_values").fetchone()
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute(
                        "INSERT OR REPLACE INTO project_values(project_id, key, value) VALUES ('', 'health', ?)",
                        (json.dumps(time.time()),),
                    )
                    conn.execute("COMMIT")
                finally:
                    conn.close()
            except sqlite3.Error as error:
                state, detail = store_state(error), str(error)
        failure = self._failure
        if state == "ok" and failure is not None and now - failure[0] < FAILURE_MEMORY:
            state, detail = failure[1], failure[2]
        report: dict[str, Any] = {"state": state, "path": str(self.path)}
        if detail:
            report["detail"] = detail
        self._health = (now, report)
        return report

    @classmethod
    def in_dir(cls, model_dir: Path) -> "Database":
        return cls(Path(model_dir) / DB_NAME)

    def migrate(self) -> int:
        """Apply the schema versions this file lacks, each in its own transaction (one process at a
        time: BEGIN IMMEDIATE); returns the version the file is at."""
        if self.connection().execute("PRAGMA user_version").fetchone()[0] >= len(MIGRATIONS):
            return len(MIGRATIONS)  # the usual case: no write lock taken
        for version, script in enumerate(MIGRATIONS, start=1):
            with self.transaction() as conn:
                if conn.execute("PRAGMA user_version").fetchone()[0] >= version:
                    continue
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")
        return len(MIGRATIONS)

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
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            self.note_failure(error)
            raise
        try:
            yield conn
        except BaseException as error:
            _rollback(conn)
            if isinstance(error, sqlite3.Error):
                self.note_failure(error)
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as error:  # a full disk shows here: nothing was written, the connection stays usable
            _rollback(conn)
            self.note_failure(error)
            raise
        self._failure = None

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
        return self._get(self.connection(), project_id, key)

    def set_value(self, project_id: str, key: str, value: Any) -> None:
        with self.transaction() as conn:
            self._set(conn, project_id, key, value)

    @staticmethod
    def _get(conn: sqlite3.Connection, project_id: str, key: str) -> Any:
        row = conn.execute("SELECT value FROM project_values WHERE project_id=? AND key=?", (project_id, key)).fetchone()
        return json.loads(row["value"]) if row is not None else None

    @staticmethod
    def _set(conn: sqlite3.Connection, project_id: str, key: str, value: Any) -> None:
        conn.execute(
            "INSERT INTO project_values(project_id, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT(project_id, key) DO UPDATE SET value=excluded.value",
            (project_id, key, json.dumps(value)),
        )

    def published(self, project_id: str, name: str, current: str, window: float, now: float | None = None) -> str:
        """`current`, or the value published last when that was less than `window` seconds ago.

        A value that changes in bursts (a project's examples, through webhooks) then changes what
        readers see at most once per window, whatever the burst; the first change after a quiet
        window is seen at once, and so is the first change of all (the first value read counts as
        published long ago). Shared by every process through the store.
        """
        now = time.time() if now is None else now
        key = f"published:{name}"
        seen = self.get_value(project_id, key)
        if isinstance(seen, dict) and seen.get("value") == current:
            return current
        if isinstance(seen, dict) and 0 <= now - float(seen.get("at") or 0) < window:
            return str(seen["value"])
        try:
            with self.transaction() as conn:
                seen = self._get(conn, project_id, key)  # another worker may have published meanwhile
                if isinstance(seen, dict) and seen.get("value") != current and 0 <= now - float(seen.get("at") or 0) < window:
                    return str(seen["value"])
                if not isinstance(seen, dict):
                    self._set(conn, project_id, key, {"value": current, "at": 0})
                elif seen.get("value") != current:
                    self._set(conn, project_id, key, {"value": current, "at": now})
        except sqlite3.Error:
            pass  # a store that cannot be written (full, read-only): the newest value, unpublished
        return current

    def claim_interval(self, project_id: str, name: str, interval: float, now: float | None = None) -> float | None:
        """Start something at most once per `interval` seconds per project, across every process:
        None when claimed now, else the seconds since it was last started."""
        now = time.time() if now is None else now
        key = f"started:{name}"
        with self.transaction() as conn:
            last = self._get(conn, project_id, key)
            if isinstance(last, (int, float)) and 0 <= now - last < interval:
                return now - last
            self._set(conn, project_id, key, now)
        return None


def _rollback(conn: sqlite3.Connection) -> None:
    # after some errors (a full disk, I/O) SQLite has rolled back already: there is nothing left to undo
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _statements(script: str) -> list[str]:
    # executescript() would COMMIT the open transaction first: run the statements one by one inside it
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in code.split(";") if s.strip()]
