"""The state every gunicorn worker, process and replica shares: SQLite under MODEL_DIR, or PostgreSQL.

SQLite (the default): one file, WAL mode, one connection per thread. PostgreSQL (DATABASE_URL=
postgresql://...): a psycopg connection pool per process, for several hosts sharing one store.
Nothing is cached per process, so a change made by one worker (or replica) is seen by the next
request on any other. Both engines run the same SQL (written with `?` placeholders, translated here
for PostgreSQL), the same schema (MIGRATIONS) and the same write discipline: one writer at a time.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from backend.infra.errors import BackendError
from backend.infra.masking import Secrets, shortened, url_password

DB_NAME = "backend.sqlite3"
# less free space than this under MODEL_DIR and the store is as good as full: say so before writes fail
MIN_FREE_BYTES = 1 << 20
HEALTH_EVERY = 5.0  # seconds a store check stays valid for /health (Label Studio calls it often)
FAILURE_MEMORY = 60.0  # seconds a failed write keeps the store reported as failing, unless one succeeds
# PostgreSQL: every write transaction takes this transaction-level advisory lock first, as SQLite's
# BEGIN IMMEDIATE takes the file's write lock (see Database.transaction)
WRITE_LOCK = 0x6C6C6D6E6572  # "llmner"
CONNECT_TIMEOUT = 10  # seconds to reach PostgreSQL before saying it is unreachable
RECOVERY_PROBE_BYTES = 256 * 1024  # what /health writes to tell a store that works again after a failed write
UNREACHABLE_WAIT = 1.0  # ...and once it was found unreachable, until a write succeeds again

# what a failing store raises, in either engine: catch these, never one engine's alone
STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)


def store_state(error: BaseException) -> str:
    """What a store error says about the store: full, read-only, corrupt, busy, unreachable
    (PostgreSQL) or failing."""
    if isinstance(error, psycopg.Error):
        return _pg_state(error)
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


def _pg_state(error: psycopg.Error) -> str:
    code = error.sqlstate or ""
    if code == "53100":  # disk_full
        return "full"
    if code == "25006":  # read_only_sql_transaction: a standby, or default_transaction_read_only
        return "read-only"
    if code in ("XX001", "XX002"):  # data_corrupted, index_corrupted
        return "corrupt"
    if code in ("55P03", "40P01"):  # lock_not_available (lock_timeout), deadlock_detected
        return "busy"
    if code.startswith(("08", "57P", "28", "3D")) or (not code and isinstance(error, psycopg.OperationalError)):
        # connection failures, the server shutting down, authentication, no such database, a pool timeout
        return "unreachable"
    return "failing"


def redact_url(url: str) -> str:
    """postgresql://user@host:port/dbname: where a DATABASE_URL points, without its password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://(unparsable DATABASE_URL)"
    user = f"{info['user']}@" if info.get("user") else ""
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{info.get('host') or 'localhost'}{port}/{info.get('dbname') or ''}"


class StoreUnavailable(BackendError):
    """The store cannot be used: what went wrong, in words that name it (the file under MODEL_DIR,
    or the PostgreSQL host and database; never a password)."""

    def __init__(self, where: Path | str, error: BaseException, secrets: Secrets | None = None):
        self.state = store_state(error) if isinstance(error, STORE_ERRORS) else "failing"
        postgres = isinstance(where, str) and where.startswith("postgresql://")
        if postgres:
            advice = {
                "full": "free some space on the PostgreSQL server",
                "read-only": "point DATABASE_URL at a writable primary",
                "corrupt": "restore the database from a backup",
                "busy": "another process holds the write lock; try again",
                "unreachable": "check that PostgreSQL runs there and DATABASE_URL's host, port, database, user and password",
            }.get(self.state, "check the PostgreSQL server's log")
        else:
            advice = {
                "full": "free some space under MODEL_DIR",
                "read-only": "make MODEL_DIR and the file writable by the backend",
                "corrupt": "restore it from a backup, or move it away to start with an empty store",
                "busy": "another process holds its write lock; try again",
            }.get(self.state, "check the disk under MODEL_DIR")
        detail = shortened(" ".join(str(error).split()), 300)  # one line: quick_check reports over several
        if secrets is not None:
            detail = secrets.mask(detail)
        super().__init__(f"the store {where} is {self.state} ({detail}): {advice}")

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
-- pipeline/jobs/records.py: project jobs (pre-label a whole project), their progress and the tasks that failed
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
    """
-- pipeline/delivery.py: a claim has an owner and is confirmed once its prediction is in Label Studio
-- (claims made before this version were taken only around a write that succeeded: confirmed)
ALTER TABLE deliveries ADD COLUMN owner TEXT;
ALTER TABLE deliveries ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 1;
-- pipeline/jobs/records.py: jobs run in parts on RQ workers (REDIS_URL); a part's counts are added once, when it ends (named job_parts since)
ALTER TABLE jobs ADD COLUMN runner TEXT NOT NULL DEFAULT 'process';
ALTER TABLE jobs ADD COLUMN planned INTEGER NOT NULL DEFAULT 0;
CREATE TABLE job_chunks (
    job_id TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    tasks INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    finished_at REAL,
    PRIMARY KEY (job_id, chunk)
);
""",
    """
-- pipeline/jobs/batch.py: provider batches (Batch API) of a project's jobs, and the answers they brought back
CREATE TABLE llm_batches (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    job_id TEXT NOT NULL,
    input_file_id TEXT,
    requests INTEGER NOT NULL,
    status TEXT NOT NULL,
    phase TEXT NOT NULL,
    message TEXT,
    answered INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL,
    sync_cost_usd REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX llm_batches_by_project ON llm_batches(project_id, model_version, phase);
CREATE TABLE llm_batch_answers (
    request_id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    status INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX llm_batch_answers_by_batch ON llm_batch_answers(batch_id);
""",
    """
-- pipeline/jobs/records.py: a task a job did not deliver is failed (reason: why) or pending (reason: who writes it)
ALTER TABLE jobs ADD COLUMN pending INTEGER NOT NULL DEFAULT 0;
ALTER TABLE job_failures ADD COLUMN kind TEXT NOT NULL DEFAULT 'failed';
-- ... and a second job on a project is refused while the first runs: where the first runs, to ask
ALTER TABLE jobs ADD COLUMN host TEXT;
ALTER TABLE jobs ADD COLUMN pid INTEGER;
""",
    """
-- pipeline/jobs/records.py: an RQ piece of a job is a part ("chunk" is a piece of a long text only)
ALTER TABLE job_chunks RENAME TO job_parts;
ALTER TABLE job_parts RENAME COLUMN chunk TO part;
""",
)



class Row(tuple):
    """A PostgreSQL row read by name (row["col"]) or position, as sqlite3.Row is in SQLite."""

    _names: dict[str, int]

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: psycopg.Cursor) -> Any:
    if cursor.description is None:
        return tuple
    return _row_type(tuple(column.name for column in cursor.description))


@lru_cache(maxsize=256)
def _row_type(names: tuple[str, ...]) -> type[Row]:
    return type("Row", (Row,), {"_names": {name: i for i, name in enumerate(names)}})


@lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """The project's SQL (qmark placeholders) for psycopg (format placeholders)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _pg_script(script: str) -> str:
    """A MIGRATIONS entry in PostgreSQL's dialect: floats are DOUBLE PRECISION (SQLite's REAL is 8
    bytes), integers BIGINT (SQLite's INTEGER is up to 8 bytes)."""
    return re.sub(r"\bINTEGER\b", "BIGINT", re.sub(r"\bREAL\b", "DOUBLE PRECISION", script))


class PgConnection:
    """A psycopg connection taking the project's SQL: `execute`, `executemany`, rows by name."""

    def __init__(self, conn: psycopg.Connection):
        self.raw = conn

    def execute(self, sql: str, params: tuple | list | dict = ()) -> psycopg.Cursor:
        if not params:
            return self.raw.execute(sql)
        return self.raw.execute(_pg_sql(sql), params)

    def executemany(self, sql: str, rows: Any) -> psycopg.Cursor:
        cursor = self.raw.cursor()
        rows = list(rows)
        if rows:
            cursor.executemany(_pg_sql(sql), rows)
        return cursor


def _use_wal(conn: sqlite3.Connection, patience: float = 30.0) -> None:
    """Put the file in WAL mode (once per file; later connections find it so). Two processes opening a
    new file at once race for it, and SQLite answers the loser "database is locked" at once, without
    its busy timeout: try again until the winner is done."""
    deadline = time.monotonic() + patience
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Database:
    """The shared store, at the newest schema version: a SQLite file (`Database(path)`,
    `Database.in_dir(model_dir)`) or a PostgreSQL database (`Database(url=...)`). Make one per
    process (`protocol/services.py` does): it keeps a connection per thread (SQLite) or a pool
    of them (PostgreSQL).

    Every write is `with db.transaction() as conn:`; reads are `db.query(...)` (inside a transaction
    or `db.reading()`, on that transaction's connection). `conn.execute(sql, params)` and
    `conn.executemany` take `?` placeholders in both engines and give rows readable as row["col"].
    """

    def __init__(self, path: Path | None = None, *, url: str | None = None, pool_size: int = 16):
        if (path is None) == (url is None):
            raise ValueError("a Database is a SQLite path or a PostgreSQL url")
        self.url = url
        self.path = Path(path) if path is not None else None
        self.engine = "sqlite" if url is None else "postgresql"
        self._local = threading.local()
        self._failure: tuple[float, str, str] | None = None  # (monotonic time, state, message) of the last failed write
        self._health: tuple[float, dict[str, Any]] | None = None
        self._pool: ConnectionPool | None = None
        if url is not None:
            self._secrets = Secrets([url_password(url)])
            self.where: str = redact_url(url)
            try:
                self.migrate()  # on a connection of its own: the server's own words when unreachable, before any pool
            except psycopg.Error as error:
                raise self.unavailable(error) from None
            self._pool = ConnectionPool(
                url, min_size=0, max_size=pool_size, timeout=CONNECT_TIMEOUT, open=True, name="llm-ner",
                kwargs={"autocommit": True, "row_factory": _row_factory, "connect_timeout": CONNECT_TIMEOUT},
            )
        else:
            self._secrets = Secrets()
            self.where = str(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.migrate()
            except sqlite3.DatabaseError as error:
                if store_state(error) != "corrupt":
                    raise
                # a damaged file, its schema included (the schema outgrew the first page): the worker
                # starts all the same, and /health and every request that needs the store say so (503)
                self.note_failure(error)

    @classmethod
    def in_dir(cls, model_dir: Path) -> Database:
        return cls(Path(model_dir) / DB_NAME)

    @classmethod
    def open(cls, model_dir: Path, database_url: str | None = None, pool_size: int = 16) -> Database:
        """PostgreSQL when a DATABASE_URL is given (a pool of at most `pool_size` connections), else the
        SQLite file under MODEL_DIR."""
        return cls(url=database_url, pool_size=pool_size) if database_url else cls.in_dir(model_dir)

    @classmethod
    def from_settings(cls, settings: Any) -> Database:
        url = settings.database_url.get_secret_value() if settings.database_url is not None else None
        return cls.open(settings.model_dir, url, settings.database_pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        conn = getattr(self._local, "sqlite", None)
        if conn is not None:
            conn.close()
            self._local.sqlite = None

    def unavailable(self, error: BaseException) -> StoreUnavailable:
        """The error as a StoreUnavailable naming this store."""
        return StoreUnavailable(self.path if self.path is not None else self.where, error, self._secrets)

    def check(self) -> None:
        """At start, before any worker: SQLite reads the whole file (PRAGMA quick_check), PostgreSQL
        is reached and migrated; a damaged or unreachable store raises StoreUnavailable naming it,
        instead of every worker failing to boot."""
        try:
            self.migrate()
            if self.engine == "postgresql":
                self.query("SELECT 1")
                return
            (result,) = self._sqlite().execute("PRAGMA quick_check(1)").fetchone()
        except STORE_ERRORS as error:
            raise self.unavailable(error) from None
        if result != "ok":
            raise self.unavailable(sqlite3.DatabaseError(f"database disk image is malformed: {result}"))

    def note_failure(self, error: BaseException) -> None:
        """A write or read failed: /health reports the store as failing for a while (until a write succeeds)."""
        detail = self._secrets.mask(str(error))
        self._failure = (time.monotonic(), store_state(error), detail)
        self._health = None

    def _succeeded(self) -> None:
        """A write went through: the store is usable again, and /health says so at once."""
        if self._failure is not None:
            self._failure = None
            self._health = None

    def failing(self) -> bool:
        """Whether a write or read failed lately and none succeeded since (another writer's lock aside)."""
        failure = self._failure
        return failure is not None and failure[1] != "busy" and time.monotonic() - failure[0] < FAILURE_MEMORY

    def _pool_wait(self) -> float:
        """Seconds a bookkeeping write waits for a PostgreSQL connection: CONNECT_TIMEOUT, but little
        while the server is known to be unreachable, so what follows paid LLM calls (cache, usage,
        drafts) fails in a second and the answers go out, instead of each write waiting the whole
        timeout. Durable writes (corrections, claims) always wait the whole timeout: the first of them
        after the server is back must not fail for want of patience on a loaded host."""
        failure = self._failure
        if failure is not None and failure[1] == "unreachable" and time.monotonic() - failure[0] < FAILURE_MEMORY:
            return UNREACHABLE_WAIT
        return CONNECT_TIMEOUT

    def health(self) -> dict[str, Any]:
        """The store's state for /health: {"state": ok | busy | full | read-only | corrupt |
        unreachable | failing, "engine", "path" (SQLite) or "database" (PostgreSQL, no password),
        "detail"?}. A read and a small write on a connection of its own (never waiting on another
        writer for more than 0.2 s), free space under MODEL_DIR (SQLite), and this process's last
        failure; cached a few seconds."""
        now = time.monotonic()
        if self._health is not None and now - self._health[0] < HEALTH_EVERY:
            return self._health[1]
        state, detail = ("ok", None) if self.engine == "postgresql" else self._disk_state()
        if state == "ok":
            recovering = self.failing()
            try:
                self._probe_write(RECOVERY_PROBE_BYTES if recovering else 0)
            except STORE_ERRORS as error:
                state, detail = store_state(error), str(error)
            else:
                if recovering:  # a write the size of a long correction went through: the store works again
                    self._succeeded()
        failure = self._failure
        if state == "ok" and failure is not None and now - failure[0] < FAILURE_MEMORY:
            state, detail = failure[1], failure[2]
        report: dict[str, Any] = {"state": state, "engine": self.engine}
        report["path" if self.engine == "sqlite" else "database"] = self.where
        if detail:
            report["detail"] = self._secrets.mask(detail)
        self._health = (now, report)
        return report

    def _disk_state(self) -> tuple[str, str | None]:
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError as error:
            return "failing", str(error)
        if free < MIN_FREE_BYTES:
            return "full", f"{free} bytes free under {self.path.parent}"
        return "ok", None

    def _probe_write(self, room: int = 0) -> None:
        """A small write (the row is overwritten each time); with `room`, one of that many bytes more:
        after a failed write a few bytes going through prove little (a full disk still takes them)."""
        write = (
            "INSERT INTO project_values(project_id, key, value) VALUES ('', 'health', ?) "
            "ON CONFLICT(project_id, key) DO UPDATE SET value=excluded.value"
        )
        value = json.dumps({"at": time.time(), "room": "x" * room} if room else time.time())
        if self.engine == "postgresql":
            with self._pool.connection(timeout=2) as raw:
                with raw.transaction():
                    conn = PgConnection(raw)
                    conn.execute("SET LOCAL lock_timeout = '200ms'")
                    conn.execute("SELECT count(*) FROM project_values")
                    conn.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
                    conn.execute(write, (value,))
            return
        conn = sqlite3.connect(self.path, timeout=0.2, isolation_level=None)
        try:
            conn.execute("SELECT count(*) FROM project_values").fetchone()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(write, (value,))
            conn.execute("COMMIT")
        finally:
            conn.close()

    # ---- schema ----
    def version(self) -> int:
        """The schema version the store is at (0: empty)."""
        if self.engine == "sqlite":
            return self._sqlite().execute("PRAGMA user_version").fetchone()[0]
        with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as raw:
            return self._pg_version(PgConnection(raw))

    @staticmethod
    def _pg_version(conn: PgConnection) -> int:
        if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            return 0
        return conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]

    def migrate(self) -> int:
        """Apply the schema versions the store lacks, each in its own transaction, one process at
        a time (SQLite: BEGIN IMMEDIATE, the version in PRAGMA user_version; PostgreSQL: the write
        lock, the versions in the schema_version table); returns the version the store is at."""
        if self.engine == "postgresql":
            return self._pg_migrate()
        if self._sqlite().execute("PRAGMA user_version").fetchone()[0] >= len(MIGRATIONS):
            return len(MIGRATIONS)  # the usual case: no write lock taken
        for version, script in enumerate(MIGRATIONS, start=1):
            with self.transaction() as conn:
                if conn.execute("PRAGMA user_version").fetchone()[0] >= version:
                    continue
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")
        return len(MIGRATIONS)

    def _pg_migrate(self) -> int:
        # a connection of its own, not the pool's: a wrong DATABASE_URL fails here with the server's
        # own words (a pool would only say it timed out)
        with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, row_factory=_row_factory) as raw:
            conn = PgConnection(raw)
            if self._pg_version(conn) >= len(MIGRATIONS):
                return len(MIGRATIONS)
            for version, script in enumerate(MIGRATIONS, start=1):
                with raw.transaction():
                    # replicas starting at once queue here; the first applies, the others find it done
                    conn.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
                    conn.execute(
                        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
                    )
                    if self._pg_version(conn) >= version:
                        continue
                    for statement in _statements(_pg_script(script)):
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_version(version, applied_at) VALUES (?, ?)", (version, time.time()))
        return len(MIGRATIONS)

    # ---- connections and transactions ----
    def connection(self) -> sqlite3.Connection:
        """This thread's SQLite connection (SQLite only: PostgreSQL's are lent by `transaction`,
        `reading` and `query`)."""
        if self.engine != "sqlite":
            raise RuntimeError("connection() is SQLite's: use transaction(), reading() or query()")
        return self._sqlite()

    def _sqlite(self) -> sqlite3.Connection:
        conn = getattr(self._local, "sqlite", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN ourselves, so writes are explicit transactions
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            _use_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.sqlite = conn
        return conn

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[Any]:
        """A write transaction; writers queue, one at a time, in both engines. SQLite: BEGIN
        IMMEDIATE takes the file's write lock up front, so concurrent writers queue, not deadlock.
        PostgreSQL: the first statement takes a transaction-level advisory lock (WRITE_LOCK),
        released at COMMIT or ROLLBACK; every read-then-write below (the example-set fingerprint,
        claims, "newest annotation wins") then sees every earlier writer's commit, as in SQLite.

        durable=False (bookkeeping that is cheap to lose: cached answers, usage totals, drafts):
        PostgreSQL commits without waiting for the WAL flush (synchronous_commit off for this
        transaction; a server crash may lose the last fraction of a second of them, never corrupt
        anything), which is what SQLite's WAL with synchronous=NORMAL gives every commit."""
        if self.engine == "postgresql":
            with self._pg_transaction(write=True, durable=durable) as conn:
                yield conn
            return
        conn = self._sqlite()
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
        self._succeeded()

    @contextmanager
    def reading(self) -> Iterator[Any]:
        """A read-only transaction: every query in it sees the same snapshot of the store."""
        if self.engine == "postgresql":
            with self._pg_transaction(write=False) as conn:
                yield conn
            return
        conn = self._sqlite()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    @contextmanager
    def _pg_transaction(self, write: bool, durable: bool = True) -> Iterator[PgConnection]:
        if getattr(self._local, "pg", None) is not None:
            raise RuntimeError("a transaction is open on this thread already")
        try:
            # bookkeeping (not durable) gives up soon while the server is known to be unreachable
            with self._pool.connection(timeout=CONNECT_TIMEOUT if durable else self._pool_wait()) as raw, raw.transaction():
                conn = PgConnection(raw)
                if write:
                    if not durable:
                        conn.execute("SET LOCAL synchronous_commit = off")
                    conn.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
                else:
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                self._local.pg = conn
                try:
                    yield conn
                finally:
                    self._local.pg = None
        except psycopg.Error as error:
            self.note_failure(error)
            raise
        if write:
            self._succeeded()

    def query(self, sql: str, params: tuple | list | dict = ()) -> list[Any]:
        """The rows of one SELECT (on this thread's open transaction, if any)."""
        if self.engine == "sqlite":
            return self._sqlite().execute(sql, params).fetchall()
        conn = getattr(self._local, "pg", None)
        if conn is not None:
            return conn.execute(sql, params).fetchall()
        with self._pool.connection() as raw:
            return PgConnection(raw).execute(sql, params).fetchall()

    # ---- project state ----
    def save_label_config(self, project_id: str, label_config: str) -> None:
        if self.label_config(project_id) == label_config:
            return  # the usual case (Label Studio sends it with every /predict): a read, no write transaction
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO projects(project_id, label_config, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(project_id) DO UPDATE SET label_config=excluded.label_config, "
                "updated_at=excluded.updated_at WHERE projects.label_config != excluded.label_config",
                (project_id, label_config, time.time()),
            )

    def projects_changed_since(self, since: float) -> int:
        """How many projects had their label config created or changed since `since` (epoch seconds)."""
        return int(self.query("SELECT COUNT(*) AS n FROM projects WHERE updated_at >= ?", (since,))[0]["n"])

    def label_config(self, project_id: str) -> str | None:
        rows = self.query("SELECT label_config FROM projects WHERE project_id=?", (project_id,))
        return rows[0]["label_config"] if rows else None

    def get_value(self, project_id: str, key: str) -> Any:
        rows = self.query("SELECT value FROM project_values WHERE project_id=? AND key=?", (project_id, key))
        return json.loads(rows[0]["value"]) if rows else None

    def set_value(self, project_id: str, key: str, value: Any) -> None:
        with self.transaction() as conn:
            self._set(conn, project_id, key, value)

    @staticmethod
    def _get(conn: Any, project_id: str, key: str) -> Any:
        row = conn.execute("SELECT value FROM project_values WHERE project_id=? AND key=?", (project_id, key)).fetchone()
        return json.loads(row["value"]) if row is not None else None

    @staticmethod
    def _set(conn: Any, project_id: str, key: str, value: Any) -> None:
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
        except STORE_ERRORS:
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
