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
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from backend.infra import metrics
from backend.infra.storage import Database
from backend.infra.usage import Usage, UsageLedger, cost_usd
from backend.pipeline.delivery import Deliveries, Delivery, import_predictions
from backend.pipeline.prelabel import Prelabeler, unanswered_reason

log = logging.getLogger(__name__)

SCOPES = ("missing", "unannotated", "stale", "all")
SCOPE_HELP = {
    "missing": "tasks with no prediction at all (what opening a task would ask for)",
    "unannotated": "tasks with no annotation and no prediction of the current model_version",
    "stale": "tasks with no annotation whose newest prediction is of an older model_version",
    "all": "every task without a prediction of the current model_version, annotated or not",
}
CHUNK = 50  # tasks pre-labeled and written together
PAGE = 100  # tasks read from Label Studio per request
HEARTBEAT = 60.0  # a running job not heard of for this long was interrupted (its process died)


@dataclass
class JobSpec:
    project_id: int
    scope: str = "missing"
    limit: int | None = None  # at most this many tasks pre-labeled
    concurrency: int = 8
    max_cost: float | None = None  # USD: the job stops once it has spent this much
    attempts: int = 3  # tries per task within the job (each try has the LLM client's own retries)


def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def wanted(task: Any, version: str, scope: str) -> bool:
    """Whether a task (as the SDK lists it with fields="all") is in the job's scope."""
    predictions = _field(task, "predictions") or []
    versions = [_field(p, "model_version") for p in predictions]
    if version in versions:
        return False  # never a second prediction of one version
    annotated = bool(_field(task, "total_annotations") or [
        a for a in _field(task, "annotations") or [] if not _field(a, "was_cancelled", False)
    ])
    if scope == "missing":
        return not predictions
    if scope == "unannotated":
        return not annotated
    if scope == "stale":
        if annotated or not predictions:
            return False
        newest = max(predictions, key=lambda p: (str(_field(p, "created_at") or ""), _field(p, "id") or 0))
        return _field(newest, "model_version") != version
    return True  # all


def project_tasks(client: Any, project_id: int) -> Iterator[Any]:
    """Every task of the project, read a page at a time (the SDK's pager fetches the next page lazily)."""
    yield from client.tasks.list(project=project_id, fields="all", page_size=PAGE)


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
                "INSERT OR REPLACE INTO job_failures(job_id, task_id, reason) VALUES (?, ?, ?)", (job_id, task_id, reason[:500])
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

    def run(self) -> dict[str, Any]:
        """Pre-label the project's tasks in scope; returns the job's final record."""
        state, message = "running", ""
        try:
            chunk: list[dict[str, Any]] = []
            for task in project_tasks(self.client, self.spec.project_id):
                self.progress.seen += 1
                if not wanted(task, self.version, self.spec.scope):
                    self.progress.skipped += 1
                    continue
                chunk.append({"id": int(_field(task, "id")), "data": dict(_field(task, "data") or {})})
                if self.spec.limit is not None and self.progress.done + self.progress.failed + len(chunk) >= self.spec.limit:
                    break
                if len(chunk) >= CHUNK:
                    state, message = self._chunk(chunk)
                    chunk = []
                    if state != "running":
                        break
            if chunk and state == "running":
                state, message = self._chunk(chunk)
            if state == "running":
                state = "done"
        except Exception as error:  # noqa: BLE001 - recorded on the job: the caller reads the state
            state, message = "failed", f"{type(error).__name__}: {str(error)[:300]}"
            log.warning("job %s failed: %s", self.job_id, message)
        self.jobs.progress(self.job_id, **self.progress.figures())
        self.jobs.finish(self.job_id, state, message)
        self.on_progress(self.progress)
        return self.jobs.get(self.job_id) or {}

    def _chunk(self, tasks: list[dict[str, Any]]) -> tuple[str, str]:
        """Pre-label and write one chunk; returns ("running", "") to go on, or why the job stops."""
        if self.jobs.cancel_requested(self.job_id):
            return "cancelled", "cancelled on request"
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        todo = tasks
        for attempt in range(self.spec.attempts):
            outcomes = self.prelabeler.prelabel_many(todo, concurrency=self.spec.concurrency, deadline_seconds=3600.0)
            usages = [o.value.usage if o.error is None else getattr(o.error, "usage", None) for o in outcomes]
            self._account(usages)
            retry = []
            for task, outcome in zip(todo, outcomes):
                if outcome.error is None:
                    results[task["id"]] = outcome.value
                    failures.pop(task["id"], None)
                else:
                    failures[task["id"]] = f"{unanswered_reason(outcome.error)}: {outcome.error}"
                    retry.append(task)
            if not retry or attempt + 1 == self.spec.attempts:
                break
            self.sleep(min(30.0, 2.0 * 2**attempt))  # an outage may pass: try the failed ones again later
            todo = retry
        written = [t for t in tasks if t["id"] in results]
        deliveries = [
            Delivery(str(self.spec.project_id), t["id"], self.version, results[t["id"]].results, results[t["id"]].score)
            for t in written
        ]
        import_predictions(self.client, self.deliveries, deliveries)
        if self.record_drafts is not None and written:
            self.record_drafts(written, [results[t["id"]].results for t in written])
        for task_id, reason in failures.items():
            self.jobs.fail_task(self.job_id, task_id, reason)
        self.progress.done += len(written)
        self.progress.failed += len(failures)
        metrics.JOB_TASKS.labels("done").inc(len(written))
        metrics.JOB_TASKS.labels("failed").inc(len(failures))
        metrics.DELIVERED.labels("job").inc(len(written))
        self.jobs.progress(self.job_id, **self.progress.figures())
        self.on_progress(self.progress)
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
        self.ledger.account(str(self.spec.project_id), usages, self.price)
