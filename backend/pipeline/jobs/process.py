"""The in-process runner: a whole project job in this process (rq's `SimpleWorker` is the model: no queue,
the work where it was asked for). A reader reads pages ahead, this thread keeps the provider busy, and a
writer writes finished tasks into Label Studio in bulk."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from backend.infra import metrics
from backend.infra.usage import Usage
from backend.learning.labelstudio import describe_error
from backend.pipeline.delivery import Delivery, import_predictions
from backend.pipeline.jobs.tries import (
    PAGE,
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

HAND_OVER = 500  # finished tasks handed to the writer at once
WRITE_EVERY = 2.0  # seconds: with a slow provider, what is finished is handed to the writer at least this often
# Each import_predictions call costs Label Studio 1.23 a recount over every task of the project that has a
# prediction (~0.7 ms each: 7 s a call at 10,000 tasks), whatever the call's size. So the writer writes
# everything finished while its last call ran, up to MAX_WRITE, in one call: calls grow as the project does.
MAX_WRITE = 5000
MAX_UNWRITTEN = 10_000  # finished tasks waiting for the writer: beyond, no new task starts (memory stays bounded)


_END = object()  # the end of a queue


@dataclass
class Progress(Reading):
    done: int = 0
    failed: int = 0
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
    def __init__(self, run: JobRun, on_progress: Callable[[Progress], None] | None = None):
        self.given = run
        self.jobs, self.job_id, self.spec = run.jobs, run.job_id, run.spec
        self.client, self.prelabeler, self.version = run.client, run.prelabeler, run.version
        self.deliveries, self.ledger, self.price = run.deliveries, run.ledger, run.price
        self.record_drafts, self.sleep = run.record_drafts, run.sleep
        self.on_progress = on_progress or (lambda progress: None)
        self.progress = Progress(usage=Usage())
        self.failures: dict[int, str] = {}  # task id -> why its last try failed
        self.watch = CancelWatch(run.jobs, run.job_id)  # started by run()
        self.pending: dict[int, str] = {}  # task id -> who else was writing it into Label Studio
        self.owner = f"job-{run.job_id}"  # its claims (pipeline/delivery.py)
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
                if len(finished) >= HAND_OVER or (finished and time.monotonic() - last_write > WRITE_EVERY):
                    self.handed += len(finished)
                    writes.put(finished)
                    finished, last_write = [], time.monotonic()
            if finished and self.stop is None:
                self.handed += len(finished)
                writes.put(finished)
        except Exception as error:
            self.stop = ("failed", describe_error(error))
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
                stop = ("failed", f"writing to Label Studio: {describe_error(error)}")
            if stop[0] != "running":
                self.stop = stop

    def _in_scope(self) -> Iterator[dict[str, Any] | None]:
        return tasks_in_scope(self.client, self.spec, self.version, self.progress)  # counts what it reads

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
