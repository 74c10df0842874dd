"""Project jobs: pre-label a whole Label Studio project, page by page, with progress, and resumable.

A job reads the project's tasks through the SDK a page at a time (memory stays flat in the number
of tasks), keeps those its scope wants, pre-labels them with the backend's own pipeline, examples
and model_version for the project, and writes the predictions into Label Studio in bulk. Opening a
task afterwards makes no /predict call: it holds a prediction of the current model_version.

Resuming needs no bookkeeping of its own: a task written before a kill holds a prediction of the
current version, so a second run skips it; a task asked but not written finds its answer in the
response cache (no call is paid twice); a (task, version) is claimed in the store before it is
written (pipeline/delivery.py), so no task gets two predictions of one version. The job's record in
the store (progress, failures, a cancel flag) is what `GET /jobs/<id>` and `llm-ner prelabel` show.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from backend.infra import metrics
from backend.infra.deadline import cancellable, pause
from backend.infra.errors import BadRequest
from backend.infra.masking import Secrets
from backend.infra.storage import Database
from backend.infra.usage import Usage, UsageLedger, cost_usd, metering
from backend.pipeline.delivery import Deliveries, Delivery, Written, holder_name, import_predictions, predicted_in_label_studio
from backend.pipeline.prelabel import Prelabeler, TaskOutcome, unanswered_reason
from backend.pipeline.scope import field_of, listed_fields, wanted

log = logging.getLogger(__name__)

CHUNK = 500  # finished tasks handed to the writer at once
WRITE_EVERY = 2.0  # seconds: with a slow provider, what is finished is handed to the writer at least this often
# Each import_predictions call costs Label Studio 1.23 a recount over every task of the project that has a
# prediction (~0.7 ms each: 7 s a call at 10,000 tasks), whatever the call's size. So the writer writes
# everything finished while its last call ran, up to MAX_WRITE, in one call: calls grow as the project does.
MAX_WRITE = 5000
MAX_UNWRITTEN = 10_000  # finished tasks waiting for the writer: beyond, no new task starts (memory stays bounded)
PAGE = 500  # tasks read from Label Studio per request
_END = object()  # the end of a queue
HEARTBEAT = 60.0  # a running job not heard of for this long was interrupted (its process died)
# a job on RQ none of whose chunks ended for this long (a chunk may run an hour) lost them: it no
# longer keeps its project from a new job
QUEUED_SILENCE = 3600.0
CANCEL_POLL = 1.0  # seconds between two looks at a running job's cancel flag


class CancelWatch:
    """While a job (or one chunk of it) runs: a thread that looks at its cancel flag every CANCEL_POLL
    seconds and sets `event` once it is up (its calls are cancellable on it: infra/deadline.py), and,
    with `beat`, keeps its heartbeat fresh whatever its tasks are doing: a live job is never shown as
    interrupted, whether its calls take minutes or its writes into Label Studio do."""

    def __init__(self, jobs: Jobs, job_id: str, beat: bool = True, poll: float = CANCEL_POLL):
        self.jobs, self.job_id, self.beat, self.poll = jobs, job_id, beat, poll
        self.event = threading.Event()
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"job-{job_id}-watch", daemon=True)

    def __enter__(self) -> CancelWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ended.set()
        self._thread.join()

    def _watch(self) -> None:
        last_beat = time.monotonic()
        while not self._ended.wait(self.poll):
            try:
                if not self.event.is_set() and self.jobs.cancel_requested(self.job_id):
                    self.event.set()
                if self.beat and time.monotonic() - last_beat >= HEARTBEAT / 4:
                    self.jobs.beat(self.job_id)
                    last_beat = time.monotonic()
            except Exception as error:  # the store is down for a moment: look again later
                log.warning("job %s: cannot read its record: %s", self.job_id, error)


class TooManyJobs(BadRequest):
    """JOBS_MAX_RUNNING jobs are running: a new one is refused (429), naming them."""

    def __init__(self, running: list[str], limit: int):
        names = ", ".join(running[:5]) + (f" and {len(running) - 5} more" if len(running) > 5 else "")
        super().__init__(f"{len(running)} jobs are running, the most JOBS_MAX_RUNNING allows ({limit}): {names}; "
                         "start this one when one of them ends, or cancel one (DELETE /jobs/<id>)", status=429)


def _interrupted(row: dict[str, Any], now: float) -> bool:
    """A running job's record whose process died: not heard of for HEARTBEAT (a live job's watch beats
    every HEARTBEAT / 4, whatever its tasks do). A job on RQ whose chunks are all queued needs no live
    process: workers re-run a dead one's chunk."""
    on_queue = row.get("runner") == "rq" and row.get("planned")
    return not on_queue and now - row["heartbeat_at"] > HEARTBEAT


class JobRunning(BadRequest):
    """A second job on a project whose job is running: refused, naming the running one."""

    def __init__(self, project_id: int | str, job_id: str):
        super().__init__(f"project {project_id} has a job running: {job_id} (GET /jobs/{job_id} follows it, "
                         f"DELETE /jobs/{job_id} cancels it)", status=409)
        self.job_id = job_id


def _alive(row: dict[str, Any], now: float) -> bool:
    """Whether a running job's record belongs to a job still running, which a second job on its project
    would race: not one asked to stop (DELETE, --max-cost); its chunks on the queue, one of which
    ended within QUEUED_SILENCE; or its process alive (on this host, asked directly; elsewhere, heard
    of within HEARTBEAT)."""
    if row.get("cancel_requested"):
        return False
    if row.get("runner") == "rq" and row.get("planned"):
        return now - row["heartbeat_at"] < QUEUED_SILENCE
    if now - row["heartbeat_at"] > HEARTBEAT:
        return False
    if row.get("host") == socket.gethostname() and row.get("pid"):
        try:
            os.kill(int(row["pid"]), 0)
        except ProcessLookupError:
            return False  # killed: its record was never ended
        except PermissionError:
            return True
    return True


@dataclass
class JobSpec:
    project_id: int
    scope: str = "missing"
    limit: int | None = None  # at most this many tasks pre-labeled
    concurrency: int | None = None  # None: the LLM client's (PREDICT_CONCURRENCY, or what the probe measured)
    max_cost: float | None = None  # USD: the job stops once it has spent this much
    attempts: int = 3  # tries per task within the job (each try has the LLM client's own retries)


def project_tasks(client: Any, project_id: int, include: str | None = None) -> Iterator[Any]:
    """Every task of the project, read a page at a time (the SDK's pager fetches the next page lazily);
    `include`: only these fields of each (scope.listed_fields)."""
    yield from client.tasks.list(project=project_id, fields="all", page_size=PAGE, **({"include": include} if include else {}))


class Jobs:
    """Job records in the shared store: any worker or process reads and cancels any job."""

    COLUMNS = ("done", "failed", "skipped", "pending", "seen", "prompt_tokens", "completion_tokens", "calls", "cost_usd")

    def __init__(self, db: Database, secrets: Secrets | None = None, max_running: int | None = None):
        self.db = db
        # messages and failure reasons quote errors, and a Label Studio or proxy error body may echo the
        # token: they are masked before they are stored (GET /jobs shows them to any caller)
        self.secrets = secrets or Secrets()
        self.max_running = max_running  # JOBS_MAX_RUNNING: jobs running at once in the whole deployment

    def create(self, spec: JobSpec, model_version: str, total: int | None, runner: str = "process") -> str:
        """A new job's record; TooManyJobs (429) when JOBS_MAX_RUNNING jobs are running already, JobRunning
        (409) when a job of the project is running (two jobs on one project would each count the other's
        tasks, and race for them)."""
        job_id = secrets.token_hex(6)
        now = time.time()
        with self.db.transaction() as conn:  # writers queue: the look and the insert are one step
            for row in conn.execute(
                "SELECT * FROM jobs WHERE project_id=? AND state='running' ORDER BY started_at DESC", (str(spec.project_id),)
            ).fetchall():
                if _alive(dict(zip(row.keys(), row)), now):
                    raise JobRunning(spec.project_id, row["id"])
            if self.max_running is not None:
                running = [dict(zip(row.keys(), row)) for row in conn.execute(
                    "SELECT id, runner, planned, heartbeat_at FROM jobs WHERE state='running' ORDER BY started_at").fetchall()]
                live = [row["id"] for row in running if not _interrupted(row, now)]
                if len(live) >= self.max_running:
                    raise TooManyJobs(live, self.max_running)
            conn.execute(
                "INSERT INTO jobs(id, project_id, spec, model_version, state, total, started_at, heartbeat_at, runner, host, pid) "
                "VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                (job_id, str(spec.project_id), json.dumps(spec.__dict__), model_version, total, now, now, runner,
                 socket.gethostname(), os.getpid()),
            )
        return job_id

    def progress(self, job_id: str, **figures: float) -> None:
        sets = ", ".join(f"{name}=?" for name in figures)
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE jobs SET {sets}, heartbeat_at=? WHERE id=?", (*figures.values(), time.time(), job_id))

    def finish(self, job_id: str, state: str, message: str = "") -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state=?, message=?, finished_at=?, heartbeat_at=? WHERE id=?",
                (state, self.secrets.mask(message), time.time(), time.time(), job_id),
            )

    def fail_task(self, job_id: str, task_id: int, reason: str, kind: str = "failed") -> None:
        """A task the job did not deliver: failed (`reason`: why) or pending (`reason`: who holds it)."""
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO job_failures(job_id, task_id, reason, kind) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(job_id, task_id) DO UPDATE SET reason=excluded.reason, kind=excluded.kind",
                (job_id, task_id, self.secrets.mask(reason)[:500], kind),
            )

    def end_interrupted(self, job_id: str) -> bool:
        """A job whose process died (shown as interrupted) ends as such in its record: nothing runs to
        cancel, and a DELETE of it answers like one of any ended job. False when it is not interrupted."""
        with self.db.transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["state"] != "running" or not _interrupted(dict(zip(row.keys(), row)), time.time()):
                return False
            conn.execute("UPDATE jobs SET state='interrupted', finished_at=?, message=? WHERE id=?",
                         (time.time(), "its process died (no heartbeat); start it again to continue", job_id))
        return True

    def lose_chunks(self, job_id: str, chunks: list[int], why: str) -> None:
        """Chunks the queue no longer holds (Redis lost its data): they end, unrun, and the job ends as
        failed with `why` (the chunks still running elsewhere add their counts when they end)."""
        with self.db.transaction() as conn:
            lost = 0
            for chunk in chunks:
                if conn.execute("UPDATE job_chunks SET state='lost', finished_at=? WHERE job_id=? AND chunk=? AND finished_at IS NULL",
                                (time.time(), job_id, chunk)).rowcount:
                    lost += conn.execute("SELECT tasks FROM job_chunks WHERE job_id=? AND chunk=?", (job_id, chunk)).fetchone()[0]
            conn.execute("UPDATE jobs SET failed=failed+?, state='failed', message=?, finished_at=?, heartbeat_at=? "
                         "WHERE id=? AND state='running'", (lost, self.secrets.mask(why), time.time(), time.time(), job_id))

    def cancel(self, job_id: str) -> bool:
        with self.db.transaction() as conn:
            changed = conn.execute(
                "UPDATE jobs SET cancel_requested=1 WHERE id=? AND state='running'", (job_id,)
            ).rowcount
        return bool(changed)

    def cancel_requested(self, job_id: str) -> bool:
        rows = self.db.query("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,))
        return bool(rows and rows[0]["cancel_requested"])

    def get(self, job_id: str, failures: int = 100) -> dict[str, Any] | None:
        rows = self.db.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        if not rows:
            return None
        job = self._describe(dict(rows[0]))
        for kind, name, why in (("failed", "failures", "reason"), ("pending", "pending_tasks", "held_by")):
            job[name] = [
                {"task": r["task_id"], why: r["reason"]}
                for r in self.db.query(
                    "SELECT task_id, reason FROM job_failures WHERE job_id=? AND kind=? ORDER BY task_id LIMIT ?",
                    (job_id, kind, failures),
                )
            ]
        return job

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT * FROM jobs ORDER BY started_at DESC LIMIT ?", (limit,))
        return [self._describe(dict(r)) for r in rows]

    # ---- jobs on RQ: chunks run by workers on any host; each adds its counts once, as it ends ----
    def record(self, job_id: str) -> dict[str, Any] | None:
        rows = self.db.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return dict(rows[0]) if rows else None

    def add_chunk(self, job_id: str, chunk: int, tasks: int, seen: int, skipped: int) -> None:
        """The planner read this far and hands a chunk to the queue (a row first: the job cannot end
        while the chunk is unfinished)."""
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO job_chunks(job_id, chunk, tasks) VALUES (?, ?, ?) ON CONFLICT (job_id, chunk) DO NOTHING",
                (job_id, chunk, tasks),
            )
            conn.execute("UPDATE jobs SET seen=?, skipped=?, heartbeat_at=? WHERE id=?", (seen, skipped, time.time(), job_id))

    def planned(self, job_id: str, seen: int, skipped: int, message: str = "") -> None:
        """The planner read every page (or stopped): the job ends with its last chunk."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET planned=1, seen=?, skipped=?, heartbeat_at=?, message=COALESCE(NULLIF(?, ''), message) WHERE id=?",
                (seen, skipped, time.time(), self.secrets.mask(message), job_id),
            )
            self._settle(conn, job_id)

    def finish_chunk(self, job_id: str, chunk: int, state: str, **increments: float) -> bool:
        """The chunk ended (done, cancelled or failed): its counts are added to the job's, once whatever
        how many runs of it end (a re-run after its worker died); the last chunk ends the job. True
        when this call was the one that ended it."""
        with self.db.transaction() as conn:
            first = conn.execute(
                "UPDATE job_chunks SET state=?, finished_at=? WHERE job_id=? AND chunk=? AND finished_at IS NULL",
                (state, time.time(), job_id, chunk),
            ).rowcount
            if first and increments:
                sets = ", ".join(f"{name}={name}+?" for name in increments if name in self.COLUMNS)
                values = [v for name, v in increments.items() if name in self.COLUMNS]
                conn.execute(f"UPDATE jobs SET {sets}, heartbeat_at=? WHERE id=?", (*values, time.time(), job_id))
            self._settle(conn, job_id)
        return bool(first)

    def beat(self, job_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("UPDATE jobs SET heartbeat_at=? WHERE id=?", (time.time(), job_id))

    def clear_failures(self, job_id: str, task_ids: Iterable[int]) -> None:
        """Tasks an earlier try failed (or found pending) and a later one delivered."""
        with self.db.transaction() as conn:
            for task_id in task_ids:
                conn.execute("DELETE FROM job_failures WHERE job_id=? AND task_id=?", (job_id, task_id))

    def stop_spending(self, job_id: str, message: str) -> None:
        """--max-cost reached: the job's chunks stop as on a cancel, and it ends as stopped."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE jobs SET cancel_requested=2, message=? WHERE id=? AND cancel_requested=0",
                         (self.secrets.mask(message), job_id))

    def settle(self, job_id: str) -> None:
        with self.db.transaction() as conn:
            self._settle(conn, job_id)

    def unfinished_chunks(self, job_id: str) -> list[int]:
        return [r["chunk"] for r in self.db.query(
            "SELECT chunk FROM job_chunks WHERE job_id=? AND finished_at IS NULL ORDER BY chunk", (job_id,))]

    @staticmethod
    def _settle(conn: Any, job_id: str) -> None:
        """End a planned job whose chunks all ended: done, or cancelled when that was asked."""
        conn.execute(
            "UPDATE jobs SET state=CASE cancel_requested WHEN 1 THEN 'cancelled' WHEN 2 THEN 'stopped' ELSE 'done' END, "
            "message=CASE cancel_requested WHEN 1 THEN 'cancelled on request' ELSE message END, finished_at=? "
            "WHERE id=? AND state='running' AND planned=1 "
            "AND NOT EXISTS (SELECT 1 FROM job_chunks WHERE job_id=? AND finished_at IS NULL)",
            (time.time(), job_id, job_id),
        )

    @staticmethod
    def _describe(row: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        if row["state"] == "running" and _interrupted(row, now):
            row["state"] = "interrupted"  # its process died: run it again to continue
        elapsed = (row["finished_at"] or now) - row["started_at"]
        rate = row["done"] / elapsed if elapsed > 0 else 0.0
        left = max(0, row["total"] - row["seen"]) if row["total"] is not None else None
        return {
            "id": row["id"],
            "project": int(row["project_id"]),
            "spec": json.loads(row["spec"]),
            "model_version": row["model_version"],
            "state": row["state"],
            "message": row["message"] or "",
            "cancel_requested": bool(row["cancel_requested"]),
            "total": row["total"],
            "seen": row["seen"],
            "done": row["done"],
            "failed": row["failed"],
            "skipped": row["skipped"],
            "pending": row.get("pending") or 0,
            "left": left,
            "tasks_per_second": round(rate, 3),
            "eta_seconds": round(left / rate, 1) if left is not None and rate > 0 and row["state"] == "running" else None,
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "calls": row["calls"],
            "cost_usd": row["cost_usd"],
            "started_at": row["started_at"],
            "finished_at": row["finished_at"],
            "runner": row.get("runner") or "process",
        }


@dataclass
class Progress:
    seen: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    pending: int = 0
    usage: Usage | None = None
    cost_usd: float = 0.0

    def figures(self) -> dict[str, float]:
        usage = self.usage or Usage()
        return {
            "seen": self.seen, "done": self.done, "failed": self.failed, "skipped": self.skipped, "pending": self.pending,
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "calls": usage.calls,
            "cost_usd": self.cost_usd,
        }


class ProjectJob:
    def __init__(
        self,
        jobs: Jobs,
        job_id: str,
        spec: JobSpec,
        client: Any,
        prelabeler: Prelabeler,
        model_version: str,
        deliveries: Deliveries,
        ledger: UsageLedger,
        price: tuple[float, float] | None,
        on_progress: Callable[[Progress], None] | None = None,
        record_drafts: Callable[[list[dict[str, Any]], list[list[dict[str, Any]]]], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.jobs, self.job_id, self.spec = jobs, job_id, spec
        self.client, self.prelabeler, self.version = client, prelabeler, model_version
        self.deliveries, self.ledger, self.price = deliveries, ledger, price
        self.on_progress = on_progress or (lambda progress: None)
        self.record_drafts = record_drafts
        self.sleep = sleep
        self.progress = Progress(usage=Usage())
        self.failures: dict[int, str] = {}  # task id -> why its last try failed
        self.watch = CancelWatch(jobs, job_id)  # started by run()
        self.pending: dict[int, str] = {}  # task id -> who else was writing it into Label Studio
        self.owner = f"job-{job_id}"  # its claims (pipeline/delivery.py)
        self.stop: tuple[str, str] | None = None  # (state, why) once the job must end early
        self.abandon = False  # interrupt(): end without waiting for the LLM calls in flight
        self.reading = True
        self.handed = self.taken = 0  # finished tasks handed to the writer (this thread), taken by it (its thread)

    def run(self) -> dict[str, Any]:
        """Pre-label the project's tasks in scope; returns the job's final record.

        Three threads keep the provider busy: a reader fetches pages of tasks ahead, this thread
        keeps 2 x `concurrency` tasks in flight (the next starts as soon as one ends, never waiting
        for the slowest of a batch), and a writer puts finished ones into Label Studio, all that finished
        during its previous call at once."""
        state, message = "running", ""
        todo: queue.Queue = queue.Queue(maxsize=2 * PAGE)
        writes: queue.Queue = queue.Queue()  # bounded by MAX_UNWRITTEN tasks
        reader = threading.Thread(target=self._read, args=(todo,), name=f"job-{self.job_id}-read", daemon=True)
        writer = threading.Thread(target=self._write_all, args=(writes,), name=f"job-{self.job_id}-write", daemon=True)
        reader.start()
        writer.start()
        concurrency = self.spec.concurrency or self.prelabeler.llm.concurrency
        pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"job-{self.job_id}")
        in_flight: dict[Future, tuple[dict[str, Any], int]] = {}
        finished: list[tuple[dict[str, Any], TaskOutcome]] = []
        read_all = False
        watch = self.watch.__enter__()

        def again(task: dict[str, Any], attempt: int) -> Future | None:  # an outage may pass: try it again, later
            return pool.submit(self._attempt, task, attempt) if attempt < self.spec.attempts and not watch.event.is_set() else None

        last_write = time.monotonic()
        try:
            while self.stop is None:
                if watch.event.is_set():  # cancelled: nothing new starts, the calls in flight are abandoned
                    self.stop = ("cancelled", "cancelled on request")
                    break
                while not read_all and len(in_flight) < 2 * concurrency and self.handed - self.taken < MAX_UNWRITTEN:
                    try:
                        item = todo.get_nowait() if in_flight else todo.get(timeout=0.5)
                    except queue.Empty:
                        break
                    if item is _END:
                        read_all = True
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        in_flight[pool.submit(self._attempt, item, 0)] = (item, 0)
                if read_all and not in_flight:
                    break
                if not in_flight:
                    if self.handed - self.taken >= MAX_UNWRITTEN:
                        time.sleep(0.1)  # the writer is behind: wait for it rather than spin
                    continue
                finished += collect_tries(in_flight, self.failures, self._account, again)
                if len(finished) >= CHUNK or (finished and time.monotonic() - last_write > WRITE_EVERY):
                    self.handed += len(finished)
                    writes.put(finished)
                    finished, last_write = [], time.monotonic()
            if finished and self.stop is None:
                self.handed += len(finished)
                writes.put(finished)
        except Exception as error:
            self.stop = ("failed", f"{type(error).__name__}: {str(error)[:300]}")
        finally:
            self.reading = False
            # a stopped job lets the calls in flight end (their answers are cached); a cancelled one's
            # end within CANCEL_LOOK (their connections closed); neither starts anything more; an interrupted one (Ctrl-C) waits for none
            pool.shutdown(wait=not self.abandon, cancel_futures=True)
            writes.put(_END)
            writer.join()
            watch.__exit__()
        state, message = self.stop or ("done", "")
        if state == "failed":
            log.warning("job %s failed: %s", self.job_id, message)
        for task_id, reason in self.failures.items():
            self.jobs.fail_task(self.job_id, task_id, reason)
        for task_id, holder in self.pending.items():
            self.jobs.fail_task(self.job_id, task_id, holder, kind="pending")
        self.progress.failed = len(self.failures)
        self.progress.pending = len(self.pending)
        metrics.JOB_TASKS.labels("failed").inc(len(self.failures))
        self.jobs.progress(self.job_id, **self.progress.figures())
        self.jobs.finish(self.job_id, state, message)
        self.on_progress(self.progress)
        return self.jobs.get(self.job_id) or {}

    def interrupt(self, why: str) -> None:
        """End the job at once (Ctrl-C at a terminal): start nothing more, wait for no LLM call in
        flight; what was written stays, and the write under way ends first."""
        self.abandon = True
        self.stop = ("cancelled", why)

    def _read(self, todo: queue.Queue) -> None:
        try:
            for task in self._in_scope():
                while self.reading:
                    try:
                        todo.put(task, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if not self.reading:
                    return
            todo.put(_END)
        except Exception as error:
            todo.put(error)

    def _write_all(self, writes: queue.Queue) -> None:
        ended = False
        while not ended:
            batch = writes.get()
            if batch is _END:
                break
            while len(batch) < MAX_WRITE:  # what finished during the previous call: one call for all of it
                try:
                    more = writes.get_nowait()
                except queue.Empty:
                    break
                if more is _END:
                    ended = True
                    break
                batch = batch + more
            self.taken += len(batch)
            if self.stop is not None:
                continue  # stopped: what is left is in the cache for the next run
            try:
                stop = self._write(batch)
            except Exception as error:
                stop = ("failed", f"writing to Label Studio: {type(error).__name__}: {str(error)[:300]}")
            if stop[0] != "running":
                self.stop = stop

    def _in_scope(self) -> Iterator[dict[str, Any]]:
        """The project's tasks the scope wants, at most `limit`, as {"id", "data"}; counts what it reads."""
        taken = 0
        for task in project_tasks(self.client, self.spec.project_id, listed_fields(self.spec.scope, self.version)):
            if self.spec.limit is not None and taken >= self.spec.limit:
                return
            self.progress.seen += 1
            if not wanted(task, self.version, self.spec.scope):
                self.progress.skipped += 1
                continue
            taken += 1
            yield {"id": int(field_of(task, "id")), "data": dict(field_of(task, "data") or {})}

    def _attempt(self, task: dict[str, Any], attempt: int) -> TaskOutcome:
        return attempt_task(self.prelabeler, task, attempt, self.sleep, self.watch.event)

    def _write(self, finished: list[tuple[dict[str, Any], TaskOutcome]]) -> tuple[str, str]:
        """Write finished tasks into Label Studio (the writer thread); returns ("running", "") to go on,
        or why the job stops."""
        deliveries = [Delivery(str(self.spec.project_id), t["id"], self.version, o.results, o.score) for t, o in finished]
        written = import_predictions(self.client, self.deliveries, deliveries, owner=self.owner)
        delivered = [(t, o) for t, o in finished if t["id"] in written.delivered]
        if self.record_drafts is not None and delivered:
            self.record_drafts([t for t, _ in delivered], [o.results for _, o in delivered])
        self._account([o.usage for _, o in finished])
        self.progress.done += len(written.delivered)
        self.progress.skipped += len(written.present)  # Label Studio held them already (another wrote them)
        self.pending.update(written.pending)
        self.failures.update(written.failed)
        self.progress.failed = len(self.failures)
        self.progress.pending = len(self.pending)
        metrics.JOB_TASKS.labels("done").inc(len(written.delivered))
        metrics.DELIVERED.labels("job").inc(len(written.delivered))
        self.jobs.progress(self.job_id, **self.progress.figures())
        self.on_progress(self.progress)
        if self.watch.event.is_set():
            return "cancelled", "cancelled on request"
        if self.spec.max_cost is not None and self.progress.cost_usd >= self.spec.max_cost:
            return "stopped", f"spent ${self.progress.cost_usd:.4f}, the --max-cost of ${self.spec.max_cost:g}"
        return "running", ""

    def _account(self, usages: list[Usage | None]) -> None:
        self.progress.cost_usd += account_usage(self.ledger, str(self.spec.project_id), usages, self.price, self.progress.usage)


# ---- project jobs on RQ (REDIS_URL): the same work, in chunks of tasks that workers on any host run ----
#
# The planner (the process that starts the job) reads the project page by page and hands the tasks
# in scope to the queue JOB_CHUNK at a time, a row per chunk in the store first. A worker runs a
# chunk (`ChunkRun`): it pre-labels the tasks not yet delivered, writes them into Label Studio
# under claims named after the chunk, and at its end adds the chunk's counts to the job's in one
# transaction, once: a chunk re-run after its worker died finds the first run's confirmed claims
# and counts them, its answers in the shared cache (no second paid call), its unconfirmed claims
# taken over after the lease. The last chunk to end ends the job.

MAX_QUEUED_CHUNKS = 50  # the planner waits while this many of the job's chunks are unfinished (Redis memory)


def chunk_owner(job_id: str, chunk: int) -> str:
    """The prefix of the claims of every run of one chunk (each run adds a token of its own)."""
    return f"job-{job_id}/{chunk}/"


def plan_chunks(
    jobs: Jobs,
    job_id: str,
    spec: JobSpec,
    client: Any,
    model_version: str,
    chunk_size: int,
    enqueue: Callable[[int, list[dict[str, Any]]], None],
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Read the project's tasks in scope and hand them to `enqueue(chunk number, tasks)` chunk by chunk;
    memory stays flat (one page and one chunk). Stops early on a cancel; returns the job's record."""
    seen = skipped = taken = chunk = 0
    batch: list[dict[str, Any]] = []
    message = ""

    def hand_over() -> None:
        nonlocal batch, chunk
        while len(jobs.unfinished_chunks(job_id)) >= MAX_QUEUED_CHUNKS and not jobs.cancel_requested(job_id):
            jobs.beat(job_id)  # alive: the job is not shown as interrupted while it waits
            sleep(0.5)
        jobs.add_chunk(job_id, chunk, len(batch), seen, skipped)
        enqueue(chunk, batch)
        batch, chunk = [], chunk + 1

    try:
        for task in project_tasks(client, spec.project_id, listed_fields(spec.scope, model_version)):
            if spec.limit is not None and taken >= spec.limit:
                break
            seen += 1
            if not wanted(task, model_version, spec.scope):
                skipped += 1
                continue
            taken += 1
            batch.append({"id": int(field_of(task, "id")), "data": dict(field_of(task, "data") or {})})
            if len(batch) >= chunk_size:
                if jobs.cancel_requested(job_id):
                    break
                hand_over()
        if batch and not jobs.cancel_requested(job_id):
            hand_over()
    except Exception as error:
        message = f"reading the project stopped: {type(error).__name__}: {str(error)[:300]}"
        log.warning("job %s: %s", job_id, message)
    jobs.planned(job_id, seen, skipped, message)
    if message:
        jobs.finish(job_id, "failed", message)  # the chunks handed over still run and count
    return jobs.get(job_id) or {}


def account_usage(ledger: UsageLedger, project: str, usages: list[Usage | None], price: tuple[float, float] | None,
                  into: Usage) -> float:
    """Add the usage of these tries (None: a try that never reached the provider) to `into` and to the
    project's ledger; returns what they cost (0 without a price)."""
    total = Usage()
    for usage in usages:
        if usage is not None:
            total.add(usage)
    into.add(total)
    ledger.account(project, len(usages), total, price)
    return cost_usd(total, price) or 0.0


SPENT = ("deadline", "llm_deadline", "llm_timeout", "llm_context_length")  # failures a job does not try again


def collect_tries(
    in_flight: dict[Future, tuple[dict[str, Any], int]],
    failures: dict[int, str],
    account: Callable[[list[Usage | None]], None],
    again: Callable[[dict[str, Any], int], Future | None],
) -> list[tuple[dict[str, Any], TaskOutcome]]:
    """Wait (half a second at most) for tries in flight to end and return the tasks that finished. A
    failed try is metered (`account`) and its reason kept in `failures` (cleared if a later try
    succeeds); `again(task, next attempt)` may start the next try (an outage may pass) and returns its
    future, or None when the task has had its tries."""
    finished = []
    done, _ = wait(in_flight, timeout=0.5, return_when=FIRST_COMPLETED)
    for future in done:
        task, attempt = in_flight.pop(future)
        error = future.exception()
        if error is None:
            finished.append((task, future.result()))
            failures.pop(task["id"], None)
            continue
        account([getattr(error, "usage", None)])
        if getattr(error, "error_class", None) == "cancelled":
            continue  # its job was cancelled: neither failed nor tried again
        reason = unanswered_reason(error)
        failures[task["id"]] = f"{reason}: {error}"
        # a try that used up its time budget (LLM_TASK_TIMEOUT) or did not fit the context window would
        # do so again: tries are for outages; a later job or request asks it again
        retry = None if reason in SPENT else again(task, attempt + 1)
        if retry is not None:
            in_flight[retry] = (task, attempt + 1)
    return finished


def attempt_task(prelabeler: Prelabeler, task: dict[str, Any], attempt: int, sleep: Callable[[float], None],
                 cancel: threading.Event | None = None) -> TaskOutcome:
    """One try at a task (after a backoff when it is a retry), its LLM usage metered, a failed try's too;
    its answers in the shared cache before it counts as finished: a job or worker killed at any moment
    pays again only for the calls in flight (flushing when the loop collects finished tries, or when the
    writer gets to them, left up to WRITE_EVERY seconds of paid answers to a kill -9). `cancel`: once
    set, its calls end (infra/deadline.cancellable)."""
    with cancellable(cancel or threading.Event()):
        return _attempt_task(prelabeler, task, attempt, sleep)


def _attempt_task(prelabeler: Prelabeler, task: dict[str, Any], attempt: int, sleep: Callable[[float], None]) -> TaskOutcome:
    if attempt:
        pause(min(30.0, 2.0 * 2 ** (attempt - 1)), sleep)
    try:
        with metering() as meter:
            try:
                outcome = prelabeler.prelabel(task["data"], task.get("id"))
            except Exception as error:
                error.usage = meter.take()  # type: ignore[attr-defined]
                raise
        outcome.usage = meter.take()
        return outcome
    finally:
        prelabeler.source.flush()


class ChunkRun:
    """One run of one chunk of a job on RQ (see above)."""

    def __init__(
        self,
        jobs: Jobs,
        job_id: str,
        chunk: int,
        spec: JobSpec,
        tasks: list[dict[str, Any]],
        client: Any,
        prelabeler: Prelabeler,
        model_version: str,
        deliveries: Deliveries,
        ledger: UsageLedger,
        price: tuple[float, float] | None,
        record_drafts: Callable[[list[dict[str, Any]], list[list[dict[str, Any]]]], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.jobs, self.job_id, self.chunk, self.spec, self.tasks = jobs, job_id, chunk, spec, tasks
        self.client, self.prelabeler, self.version = client, prelabeler, model_version
        self.deliveries, self.ledger, self.price = deliveries, ledger, price
        self.record_drafts, self.sleep = record_drafts, sleep
        self.project = str(spec.project_id)
        self.prefix = chunk_owner(job_id, chunk)
        self.owner = self.prefix + secrets.token_hex(4)
        self.usage = Usage()
        self.cost = 0.0
        self.failures: dict[int, str] = {}
        self.cancel: threading.Event | None = None  # set while the chunk's tasks run: its job was cancelled
        self.present: set[int] = set()  # Label Studio held them already: skipped

    def run(self) -> str:
        """Returns how the chunk ended: done, cancelled (the job was), or "" when another run ends it."""
        if self.spec.max_cost is not None:
            spent = (self.jobs.record(self.job_id) or {}).get("cost_usd") or 0.0
            if spent >= self.spec.max_cost:
                self.jobs.stop_spending(self.job_id, f"spent ${spent:.4f}, the --max-cost of ${self.spec.max_cost:g}")
        if self.jobs.cancel_requested(self.job_id):
            return self._finish("cancelled")
        held = self.deliveries.holders(self.project, self.version, [t["id"] for t in self.tasks])
        # claimed as delivered (by an earlier run of this chunk, or by anyone): Label Studio says whether they are
        written = predicted_in_label_studio(self.client, self.project, [i for i, h in held.items() if h[1]], self.version)
        todo = [t for t in self.tasks if t["id"] not in written]
        cancelled = self._prelabel_and_write(todo)
        if not cancelled:
            self._take_over_own_claims()
        return self._finish("cancelled" if cancelled else "done")

    def _prelabel_and_write(self, todo: list[dict[str, Any]]) -> bool:
        """Pre-label `todo` (retries with backoff) and write what is finished every WRITE_EVERY seconds;
        True when the job was cancelled meanwhile (the calls in flight end, nothing new starts)."""
        concurrency = self.spec.concurrency or self.prelabeler.llm.concurrency
        pending = list(reversed(todo))
        finished: list[tuple[dict[str, Any], TaskOutcome]] = []
        last_write = time.monotonic()
        # the worker's own thread beats for the chunk (RQ's heartbeat): this one only looks for a cancel
        with CancelWatch(self.jobs, self.job_id, beat=False) as watch, \
                ThreadPoolExecutor(concurrency, thread_name_prefix=f"chunk-{self.job_id}-{self.chunk}") as pool:
            self.cancel = watch.event
            in_flight: dict[Future, tuple[dict[str, Any], int]] = {}

            def again(task: dict[str, Any], attempt: int) -> Future | None:
                return pool.submit(self._attempt, task, attempt) if attempt < self.spec.attempts and not watch.event.is_set() else None

            while pending or in_flight:
                while pending and not watch.event.is_set() and len(in_flight) < concurrency:
                    task = pending.pop()
                    in_flight[pool.submit(self._attempt, task, 0)] = (task, 0)
                if not in_flight:
                    break
                finished += collect_tries(in_flight, self.failures, self._account, again)
                if finished and (not (pending or in_flight) or time.monotonic() - last_write > WRITE_EVERY):
                    self._write(finished)
                    finished, last_write = [], time.monotonic()
            cancelled = watch.event.is_set()
        if finished:  # answered and paid for before the cancel: written, not dropped
            self._write(finished)
        return cancelled

    def _attempt(self, task: dict[str, Any], attempt: int) -> TaskOutcome:
        return attempt_task(self.prelabeler, task, attempt, self.sleep, self.cancel)

    def _write(self, finished: list[tuple[dict[str, Any], TaskOutcome]]) -> None:
        deliveries = [Delivery(self.project, t["id"], self.version, o.results, o.score) for t, o in finished]
        written: Written = import_predictions(self.client, self.deliveries, deliveries, owner=self.owner)
        delivered = [(t, o) for t, o in finished if t["id"] in written.delivered]
        if self.record_drafts is not None and delivered:
            self.record_drafts([t for t, _ in delivered], [o.results for _, o in delivered])
        self._account([o.usage for _, o in finished])
        self.present |= written.present
        self.failures.update(written.failed)
        metrics.JOB_TASKS.labels("done").inc(len(written.delivered))
        metrics.DELIVERED.labels("job").inc(len(written.delivered))

    def _take_over_own_claims(self) -> None:
        """Claims an earlier run of this chunk took and never confirmed (its worker died between the claim
        and the write): wait out their lease, then take them over (import_predictions looks in Label
        Studio first). Claims of anyone else are theirs to deliver."""
        while True:
            held = self.deliveries.holders(self.project, self.version, [t["id"] for t in self.tasks])
            stuck = {i: at for i, (owner, confirmed, at) in held.items()
                     if not confirmed and owner and owner.startswith(self.prefix) and owner != self.owner}
            if not stuck:
                return
            wait_for = min(stuck.values()) + self.deliveries.lease - self.deliveries.clock() + 0.1
            if wait_for > 0:
                self.sleep(min(wait_for, 5.0))
                if self.jobs.cancel_requested(self.job_id):
                    return
                continue
            tasks = [t for t in self.tasks if t["id"] in stuck]
            self._write([(t, attempt_task(self.prelabeler, t, 0, self.sleep)) for t in tasks])  # from the cache

    def _finish(self, state: str) -> str:
        held = self.deliveries.holders(self.project, self.version, [t["id"] for t in self.tasks])
        # confirmed claims were read back from Label Studio: this chunk's runs' are done, others' skipped
        mine = {i for i, (owner, confirmed, _) in held.items() if confirmed and (owner or "").startswith(self.prefix)}
        pending = {i: holder_name(owner) for i, (owner, confirmed, _) in held.items()
                   if not confirmed and not (owner or "").startswith(self.prefix)}
        others = {i for i, (owner, confirmed, _) in held.items() if i not in mine and confirmed} | (self.present - mine)
        failed = {i: why for i, why in self.failures.items() if i not in mine and i not in others and i not in pending}
        self.jobs.clear_failures(self.job_id, mine)
        for task_id, reason in failed.items():
            self.jobs.fail_task(self.job_id, task_id, reason)
        for task_id, holder in pending.items():
            self.jobs.fail_task(self.job_id, task_id, holder, kind="pending")
        metrics.JOB_TASKS.labels("failed").inc(len(failed))
        ended = self.jobs.finish_chunk(
            self.job_id, self.chunk, state, done=len(mine), skipped=len(others), failed=len(failed), pending=len(pending),
            prompt_tokens=self.usage.prompt_tokens, completion_tokens=self.usage.completion_tokens, calls=self.usage.calls,
            cost_usd=self.cost,
        )
        return state if ended else ""

    def _account(self, usages: list[Usage | None]) -> None:
        self.cost += account_usage(self.ledger, self.project, usages, self.price, self.usage)


def fail_chunk(jobs: Jobs, deliveries: Deliveries, job_id: str, chunk: int, task_ids: Iterable[int], reason: str) -> None:
    """A chunk the queue gave up on (its retries spent): the tasks its runs delivered count as done,
    the others are reported with the reason."""
    record = jobs.record(job_id)
    if record is None:
        return
    ids = list(task_ids)
    prefix = chunk_owner(job_id, chunk)
    held = deliveries.holders(record["project_id"], record["model_version"], ids)
    mine = {i for i, (owner, confirmed, _) in held.items() if confirmed and (owner or "").startswith(prefix)}
    failed = [i for i in ids if i not in held]
    for task_id in failed:
        jobs.fail_task(job_id, task_id, reason)
    metrics.JOB_TASKS.labels("failed").inc(len(failed))
    jobs.finish_chunk(job_id, chunk, "failed", done=len(mine), skipped=len(held) - len(mine), failed=len(failed))
