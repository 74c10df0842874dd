"""Job records in the shared store (rq's `job` and `registry`): what `GET /jobs/<id>` and `llm-ner prelabel`
show, for any runner: a job's spec, its progress and failures, its cancel flag and its heartbeat; a job on
RQ's parts, each of which adds its counts once; and the limits on jobs running at once."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from backend.infra.errors import BadRequest
from backend.infra.masking import Secrets
from backend.infra.storage import Database

log = logging.getLogger(__name__)

# a job on RQ none of whose parts ended for this long (a part may run an hour) lost them: it no
# longer keeps its project from a new job
QUEUED_SILENCE = 3600.0


class TooManyJobs(BadRequest):
    """JOBS_MAX_RUNNING jobs are running: a new one is refused (429), naming them."""

    def __init__(self, running: list[str], limit: int):
        names = ", ".join(running[:5]) + (f" and {len(running) - 5} more" if len(running) > 5 else "")
        super().__init__(f"{len(running)} jobs are running, the most JOBS_MAX_RUNNING allows ({limit}): {names}; "
                         "start this one when one of them ends, or cancel one (DELETE /jobs/<id>)", status=429)


def _interrupted(row: dict[str, Any], now: float, heartbeat: float) -> bool:
    """A running job's record whose process died: not heard of for `heartbeat` seconds (JOB_HEARTBEAT; a
    live job's watch beats every quarter of it, whatever its tasks do). A job on RQ whose parts are all queued needs no live
    process: workers re-run a dead one's part."""
    on_queue = row.get("runner") == "rq" and row.get("planned")
    return not on_queue and now - row["heartbeat_at"] > heartbeat


class JobRunning(BadRequest):
    """A second job on a project whose job is running: refused, naming the running one."""

    def __init__(self, project_id: int | str, job_id: str):
        super().__init__(f"project {project_id} has a job running: {job_id} (GET /jobs/{job_id} follows it, "
                         f"DELETE /jobs/{job_id} cancels it)", status=409)
        self.job_id = job_id


def _alive(row: dict[str, Any], now: float, heartbeat: float) -> bool:
    """Whether a running job's record belongs to a job still running, which a second job on its project
    would race: not one asked to stop (DELETE, --max-cost); its parts on the queue, one of which
    ended within QUEUED_SILENCE; or its process alive (on this host, asked directly; elsewhere, heard
    of within `heartbeat` seconds)."""
    if row.get("cancel_requested"):
        return False
    if row.get("runner") == "rq" and row.get("planned"):
        return now - row["heartbeat_at"] < QUEUED_SILENCE
    if now - row["heartbeat_at"] > heartbeat:
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


class Jobs:
    """Job records in the shared store: any worker or process reads and cancels any job."""

    COLUMNS = ("done", "failed", "skipped", "pending", "seen", "prompt_tokens", "completion_tokens", "calls", "cost_usd")

    def __init__(self, db: Database, secrets: Secrets | None = None, max_running: int | None = None,
                 heartbeat: float = 60.0):
        self.db = db
        # messages and failure reasons quote errors, and a Label Studio or proxy error body may echo the
        # token: they are masked before they are stored (GET /jobs shows them to any caller)
        self.secrets = secrets or Secrets()
        self.max_running = max_running  # JOBS_MAX_RUNNING: jobs running at once in the whole deployment
        self.heartbeat = heartbeat  # JOB_HEARTBEAT: a running job not heard of for this long was interrupted

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
                if _alive(dict(zip(row.keys(), row)), now, self.heartbeat):
                    raise JobRunning(spec.project_id, row["id"])
            if self.max_running is not None:
                running = [dict(zip(row.keys(), row)) for row in conn.execute(
                    "SELECT id, runner, planned, heartbeat_at FROM jobs WHERE state='running' ORDER BY started_at").fetchall()]
                live = [row["id"] for row in running if not _interrupted(row, now, self.heartbeat)]
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
            if row is None or row["state"] != "running" or not _interrupted(dict(zip(row.keys(), row)), time.time(), self.heartbeat):
                return False
            conn.execute("UPDATE jobs SET state='interrupted', finished_at=?, message=? WHERE id=?",
                         (time.time(), "its process died (no heartbeat); start it again to continue", job_id))
        return True

    def lose_parts(self, job_id: str, parts: list[int], why: str) -> None:
        """Parts the queue no longer holds (Redis lost its data): they end, unrun, and the job ends as
        failed with `why` (the parts still running elsewhere add their counts when they end)."""
        with self.db.transaction() as conn:
            lost = 0
            for part in parts:
                if conn.execute("UPDATE job_parts SET state='lost', finished_at=? WHERE job_id=? AND part=? AND finished_at IS NULL",
                                (time.time(), job_id, part)).rowcount:
                    lost += conn.execute("SELECT tasks FROM job_parts WHERE job_id=? AND part=?", (job_id, part)).fetchone()[0]
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

    # ---- jobs on RQ: parts run by workers on any host; each adds its counts once, as it ends ----
    def record(self, job_id: str) -> dict[str, Any] | None:
        rows = self.db.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return dict(rows[0]) if rows else None

    def add_part(self, job_id: str, part: int, tasks: int, seen: int, skipped: int) -> None:
        """The planner read this far and hands a part to the queue (a row first: the job cannot end
        while the part is unfinished)."""
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO job_parts(job_id, part, tasks) VALUES (?, ?, ?) ON CONFLICT (job_id, part) DO NOTHING",
                (job_id, part, tasks),
            )
            conn.execute("UPDATE jobs SET seen=?, skipped=?, heartbeat_at=? WHERE id=?", (seen, skipped, time.time(), job_id))

    def planned(self, job_id: str, seen: int, skipped: int, message: str = "") -> None:
        """The planner read every page (or stopped): the job ends with its last part."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET planned=1, seen=?, skipped=?, heartbeat_at=?, message=COALESCE(NULLIF(?, ''), message) WHERE id=?",
                (seen, skipped, time.time(), self.secrets.mask(message), job_id),
            )
            self._settle(conn, job_id)

    def finish_part(self, job_id: str, part: int, state: str, **increments: float) -> bool:
        """The part ended (done, cancelled or failed): its counts are added to the job's, once whatever
        how many runs of it end (a re-run after its worker died); the last part ends the job. True
        when this call was the one that ended it."""
        with self.db.transaction() as conn:
            first = conn.execute(
                "UPDATE job_parts SET state=?, finished_at=? WHERE job_id=? AND part=? AND finished_at IS NULL",
                (state, time.time(), job_id, part),
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
        """--max-cost reached: the job's parts stop as on a cancel, and it ends as stopped."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE jobs SET cancel_requested=2, message=? WHERE id=? AND cancel_requested=0",
                         (self.secrets.mask(message), job_id))

    def settle(self, job_id: str) -> None:
        with self.db.transaction() as conn:
            self._settle(conn, job_id)

    def unfinished_parts(self, job_id: str) -> list[int]:
        return [r["part"] for r in self.db.query(
            "SELECT part FROM job_parts WHERE job_id=? AND finished_at IS NULL ORDER BY part", (job_id,))]

    @staticmethod
    def _settle(conn: Any, job_id: str) -> None:
        """End a planned job whose parts all ended: done, or cancelled when that was asked."""
        conn.execute(
            "UPDATE jobs SET state=CASE cancel_requested WHEN 1 THEN 'cancelled' WHEN 2 THEN 'stopped' ELSE 'done' END, "
            "message=CASE cancel_requested WHEN 1 THEN 'cancelled on request' ELSE message END, finished_at=? "
            "WHERE id=? AND state='running' AND planned=1 "
            "AND NOT EXISTS (SELECT 1 FROM job_parts WHERE job_id=? AND finished_at IS NULL)",
            (time.time(), job_id, job_id),
        )

    def _describe(self, row: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        if row["state"] == "running" and _interrupted(row, now, self.heartbeat):
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
