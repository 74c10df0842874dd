"""Project jobs on RQ (REDIS_URL): the same work, in parts of tasks that workers on any host run.

The planner (the process that starts the job) reads the project page by page and hands the tasks
in scope to the queue JOB_PART at a time, a row per part in the store first. A worker runs a
part (`PartRun`): it pre-labels the tasks not yet delivered, writes them into Label Studio
under claims named after the part, and at its end adds the part's counts to the job's in one
transaction, once: a part re-run after its worker died finds the first run's confirmed claims
and counts them, its answers in the shared cache (no second paid call), its unconfirmed claims
taken over after the lease. The last part to end ends the job.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from backend.infra import metrics
from backend.infra.usage import Usage
from backend.learning.labelstudio import describe_error
from backend.pipeline.delivery import Deliveries, Delivery, Written, holder_name, import_predictions, predicted_in_label_studio
from backend.pipeline.jobs.process import WRITE_EVERY
from backend.pipeline.jobs.records import Jobs, JobSpec
from backend.pipeline.jobs.tries import (
    CancelWatch,
    JobRun,
    Reading,
    account_usage,
    attempt_task,
    collect_tries,
    tasks_in_scope,
)
from backend.pipeline.prelabel import TaskOutcome

log = logging.getLogger(__name__)

MAX_QUEUED_PARTS = 50  # the planner waits while this many of the job's parts are unfinished (Redis memory)


def part_owner(job_id: str, part: int) -> str:
    """The prefix of the claims of every run of one part (each run adds a token of its own)."""
    return f"job-{job_id}/{part}/"


def plan_parts(
    jobs: Jobs,
    job_id: str,
    spec: JobSpec,
    client: Any,
    model_version: str,
    part_size: int,
    enqueue: Callable[[int, list[dict[str, Any]]], None],
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Read the project's tasks in scope and hand them to `enqueue(part number, tasks)` part by part;
    memory stays flat (one page and one part). Stops early on a cancel; returns the job's record."""
    reading = Reading()
    part = 0
    batch: list[dict[str, Any]] = []
    message = ""

    def hand_over() -> None:
        nonlocal batch, part
        while len(jobs.unfinished_parts(job_id)) >= MAX_QUEUED_PARTS and not jobs.cancel_requested(job_id):
            jobs.beat(job_id)  # alive: the job is not shown as interrupted while it waits
            sleep(0.5)
        jobs.add_part(job_id, part, len(batch), reading.seen, reading.skipped)
        enqueue(part, batch)
        batch, part = [], part + 1

    try:
        for task in tasks_in_scope(client, spec, model_version, reading):
            batch.append(task)
            if len(batch) >= part_size:
                if jobs.cancel_requested(job_id):
                    break
                hand_over()
        if batch and not jobs.cancel_requested(job_id):
            hand_over()
    except Exception as error:
        message = f"reading the project stopped: {describe_error(error)}"
        log.warning("job %s: %s", job_id, message)
    jobs.planned(job_id, reading.seen, reading.skipped, message)
    if message:
        jobs.finish(job_id, "failed", message)  # the parts handed over still run and count
    return jobs.get(job_id) or {}


class PartRun:
    """One run of one part of a job on RQ (see above)."""

    def __init__(self, run: JobRun, part: int, tasks: list[dict[str, Any]]):
        self.given = run
        self.jobs, self.job_id, self.part, self.spec, self.tasks = run.jobs, run.job_id, part, run.spec, tasks
        self.client, self.prelabeler, self.version = run.client, run.prelabeler, run.version
        self.deliveries, self.ledger, self.price = run.deliveries, run.ledger, run.price
        self.record_drafts, self.sleep = run.record_drafts, run.sleep
        self.project = run.project
        self.prefix = part_owner(run.job_id, part)
        self.owner = self.prefix + secrets.token_hex(4)
        self.usage = Usage()
        self.cost = 0.0
        self.failures: dict[int, str] = {}
        self.cancel: threading.Event | None = None  # set while the part's tasks run: its job was cancelled
        self.present: set[int] = set()  # Label Studio held them already: skipped

    def run(self) -> str:
        """Returns how the part ended: done, cancelled (the job was), or "" when another run ends it."""
        if self.spec.max_cost is not None:
            spent = (self.jobs.record(self.job_id) or {}).get("cost_usd") or 0.0
            if spent >= self.spec.max_cost:
                self.jobs.stop_spending(self.job_id, f"spent ${spent:.4f}, the --max-cost of ${self.spec.max_cost:g}")
        if self.jobs.cancel_requested(self.job_id):
            return self._finish("cancelled")
        held = self.deliveries.holders(self.project, self.version, [t["id"] for t in self.tasks])
        # claimed as delivered (by an earlier run of this part, or by anyone): Label Studio says whether they are
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
        # the worker's own thread beats for the part (RQ's heartbeat): this one only looks for a cancel
        with CancelWatch(self.jobs, self.job_id, beat=False) as watch, \
                ThreadPoolExecutor(concurrency, thread_name_prefix=f"part-{self.job_id}-{self.part}") as pool:
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
        """Claims an earlier run of this part took and never confirmed (its worker died between the claim
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
        # confirmed claims were read back from Label Studio: this part's runs' are done, others' skipped
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
        ended = self.jobs.finish_part(
            self.job_id, self.part, state, done=len(mine), skipped=len(others), failed=len(failed), pending=len(pending),
            prompt_tokens=self.usage.prompt_tokens, completion_tokens=self.usage.completion_tokens, calls=self.usage.calls,
            cost_usd=self.cost,
        )
        return state if ended else ""

    def _account(self, usages: list[Usage | None]) -> None:
        self.cost += account_usage(self.ledger, self.project, usages, self.price, self.usage)


def fail_part(jobs: Jobs, deliveries: Deliveries, job_id: str, part: int, task_ids: Iterable[int], reason: str) -> None:
    """A part the queue gave up on (its retries spent): the tasks its runs delivered count as done,
    the others are reported with the reason."""
    record = jobs.record(job_id)
    if record is None:
        return
    ids = list(task_ids)
    prefix = part_owner(job_id, part)
    held = deliveries.holders(record["project_id"], record["model_version"], ids)
    mine = {i for i, (owner, confirmed, _) in held.items() if confirmed and (owner or "").startswith(prefix)}
    failed = [i for i in ids if i not in held]
    for task_id in failed:
        jobs.fail_task(job_id, task_id, reason)
    metrics.JOB_TASKS.labels("failed").inc(len(failed))
    jobs.finish_part(job_id, part, "failed", done=len(mine), skipped=len(held) - len(mine), failed=len(failed))
