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
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from backend.infra import metrics
from backend.infra.storage import Database
from backend.infra.usage import Usage, UsageLedger, cost_usd, metering
from backend.pipeline.delivery import Deliveries, Delivery, import_predictions
from backend.pipeline.prelabel import Prelabeler, TaskOutcome, unanswered_reason
from backend.pipeline.scope import field_of, listed_fields, wanted

log = logging.getLogger(__name__)

CHUNK = 500  # finished tasks handed to the writer at once
WRITE_EVERY = 2.0  # seconds: with a slow provider, what is finished is cached and handed over at least this often
# Each import_predictions call costs Label Studio 1.23 a recount over every task of the project that has a
# prediction (~0.7 ms each: 7 s a call at 10,000 tasks), whatever the call's size. So the writer writes
# everything finished while its last call ran, up to MAX_WRITE, in one call: calls grow as the project does.
MAX_WRITE = 5000
MAX_UNWRITTEN = 10_000  # finished tasks waiting for the writer: beyond, no new task starts (memory stays bounded)
PAGE = 500  # tasks read from Label Studio per request
_END = object()  # the end of a queue
HEARTBEAT = 60.0  # a running job not heard of for this long was interrupted (its process died)


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

    COLUMNS = ("done", "failed", "skipped", "seen", "prompt_tokens", "completion_tokens", "calls", "cost_usd")

    def __init__(self, db: Database):
        self.db = db

    def create(self, spec: JobSpec, model_version: str, total: int | None) -> str:
        job_id = secrets.token_hex(6)
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO jobs(id, project_id, spec, model_version, state, total, started_at, heartbeat_at) "
                "VALUES (?, ?, ?, ?, 'running', ?, ?, ?)",
                (job_id, str(spec.project_id), json.dumps(spec.__dict__), model_version, total, now, now),
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
                (state, message, time.time(), time.time(), job_id),
            )

    def fail_task(self, job_id: str, task_id: int, reason: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO job_failures(job_id, task_id, reason) VALUES (?, ?, ?) "
                "ON CONFLICT(job_id, task_id) DO UPDATE SET reason=excluded.reason",
                (job_id, task_id, reason[:500]),
            )

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
        job["failures"] = [
            {"task": r["task_id"], "reason": r["reason"]}
            for r in self.db.query(
                "SELECT task_id, reason FROM job_failures WHERE job_id=? ORDER BY task_id LIMIT ?", (job_id, failures)
            )
        ]
        return job

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT * FROM jobs ORDER BY started_at DESC LIMIT ?", (limit,))
        return [self._describe(dict(r)) for r in rows]

    @staticmethod
    def _describe(row: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        if row["state"] == "running" and now - row["heartbeat_at"] > HEARTBEAT:
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
            "left": left,
            "tasks_per_second": round(rate, 3),
            "eta_seconds": round(left / rate, 1) if left is not None and rate > 0 and row["state"] == "running" else None,
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "calls": row["calls"],
            "cost_usd": row["cost_usd"],
            "started_at": row["started_at"],
            "finished_at": row["finished_at"],
        }


@dataclass
class Progress:
    seen: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    usage: Usage | None = None
    cost_usd: float = 0.0

    def figures(self) -> dict[str, float]:
        usage = self.usage or Usage()
        return {
            "seen": self.seen, "done": self.done, "failed": self.failed, "skipped": self.skipped,
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
        self.stop: tuple[str, str] | None = None  # (state, why) once the job must end early
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
        last_write = time.monotonic()
        try:
            while self.stop is None:
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
                done, _ = wait(in_flight, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    task, attempt = in_flight.pop(future)
                    error = future.exception()
                    if error is None:
                        finished.append((task, future.result()))
                        self.failures.pop(task["id"], None)
                        continue
                    self._account([getattr(error, "usage", None)])
                    self.failures[task["id"]] = f"{unanswered_reason(error)}: {error}"
                    if attempt + 1 < self.spec.attempts:  # an outage may pass: try it again, later
                        in_flight[pool.submit(self._attempt, task, attempt + 1)] = (task, attempt + 1)
                if len(finished) >= CHUNK or (finished and time.monotonic() - last_write > WRITE_EVERY):
                    # answers into the shared cache now, not when the writer gets to them (it may be in a
                    # long call): a killed job asks nothing twice but what was in flight
                    self.prelabeler.source.flush()
                    self.handed += len(finished)
                    writes.put(finished)
                    finished, last_write = [], time.monotonic()
            if finished and self.stop is None:
                self.prelabeler.source.flush()
                self.handed += len(finished)
                writes.put(finished)
        except Exception as error:  # noqa: BLE001 - recorded on the job: the caller reads the state
            self.stop = ("failed", f"{type(error).__name__}: {str(error)[:300]}")
        finally:
            self.reading = False
            # a cancelled or stopped job lets the calls in flight end (their answers are cached) and
            # starts nothing more
            pool.shutdown(wait=True, cancel_futures=True)
            writes.put(_END)
            writer.join()
        state, message = self.stop or ("done", "")
        if state == "failed":
            log.warning("job %s failed: %s", self.job_id, message)
        for task_id, reason in self.failures.items():
            self.jobs.fail_task(self.job_id, task_id, reason)
        self.progress.failed = len(self.failures)
        metrics.JOB_TASKS.labels("failed").inc(len(self.failures))
        self.jobs.progress(self.job_id, **self.progress.figures())
        self.jobs.finish(self.job_id, state, message)
        self.on_progress(self.progress)
        return self.jobs.get(self.job_id) or {}

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
        except Exception as error:  # noqa: BLE001 - handed to the job's thread, which records it
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
            except Exception as error:  # noqa: BLE001 - the job stops and says why
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
        if attempt:
            self.sleep(min(30.0, 2.0 * 2 ** (attempt - 1)))
        with metering() as meter:  # every LLM call of the try, a failed one's too
            try:
                outcome = self.prelabeler.prelabel(task["data"])
            except Exception as error:
                error.usage = meter.take()  # type: ignore[attr-defined] - read by run() for the ledger
                raise
        outcome.usage = meter.take()
        return outcome

    def _write(self, finished: list[tuple[dict[str, Any], TaskOutcome]]) -> tuple[str, str]:
        """Write finished tasks into Label Studio (the writer thread); returns ("running", "") to go on,
        or why the job stops."""
        self.prelabeler.source.flush()  # answers in the shared cache first: a killed job asks nothing twice
        deliveries = [Delivery(str(self.spec.project_id), t["id"], self.version, o.results, o.score) for t, o in finished]
        import_predictions(self.client, self.deliveries, deliveries)
        if self.record_drafts is not None:
            self.record_drafts([t for t, _ in finished], [o.results for _, o in finished])
        self._account([o.usage for _, o in finished])
        self.progress.done += len(finished)
        self.progress.failed = len(self.failures)
        metrics.JOB_TASKS.labels("done").inc(len(finished))
        metrics.DELIVERED.labels("job").inc(len(finished))
        self.jobs.progress(self.job_id, **self.progress.figures())
        self.on_progress(self.progress)
        if self.jobs.cancel_requested(self.job_id):
            return "cancelled", "cancelled on request"
        if self.spec.max_cost is not None and self.progress.cost_usd >= self.spec.max_cost:
            return "stopped", f"spent ${self.progress.cost_usd:.4f}, the --max-cost of ${self.spec.max_cost:g}"
        return "running", ""

    def _account(self, usages: list[Usage | None]) -> None:
        total = Usage()
        for usage in usages:
            if usage is not None:
                total.add(usage)
        self.progress.usage.add(total)
        self.progress.cost_usd += cost_usd(total, self.price) or 0.0
        self.ledger.account(str(self.spec.project_id), len(usages), total, self.price)
