"""Trying tasks, for every runner: the project's tasks read a page at a time, one try at a task (cancellable,
metered, its answers in the shared cache before it counts), the tries in flight collected, and the watch
that sees a job's cancel flag and keeps its heartbeat."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any

from backend.infra.deadline import cancellable, pause
from backend.infra.usage import Usage, UsageLedger, cost_usd, metering
from backend.pipeline.delivery import Deliveries
from backend.pipeline.jobs.records import Jobs, JobSpec
from backend.pipeline.prelabel import Prelabeler, TaskOutcome, unanswered_reason
from backend.pipeline.scope import field_of, listed_fields, wanted

log = logging.getLogger(__name__)

# (tasks delivered, their results): the drafts a job records, so a later correction can be paired with what it corrected
RecordDrafts = Callable[[list[dict[str, Any]], list[list[dict[str, Any]]]], None]

PAGE = 500  # tasks read from Label Studio per request


CANCEL_POLL = 1.0  # seconds between two looks at a running job's cancel flag


class CancelWatch:
    """While a job (or one part of it) runs: a thread that looks at its cancel flag every CANCEL_POLL
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
                if self.beat and time.monotonic() - last_beat >= self.jobs.heartbeat / 4:
                    self.jobs.beat(self.job_id)
                    last_beat = time.monotonic()
            except Exception as error:  # the store is down for a moment: look again later
                log.warning("job %s: cannot read its record: %s", self.job_id, error)


@dataclass(frozen=True)
class JobRun:
    """What any runner of a job (the whole job in this process, one part of it on RQ, the Batch API's
    write) is handed: built once, by the project's model object (`NERModel.job_run`)."""

    jobs: Jobs
    job_id: str
    spec: JobSpec
    client: Any  # the Label Studio SDK client the job reads and writes with
    prelabeler: Prelabeler  # with the job's model_version, examples and LLM client
    version: str  # the job's model_version
    deliveries: Deliveries  # the claims that keep two writers of a task from racing
    ledger: UsageLedger
    price: tuple[float, float] | None  # USD per 1M (prompt, completion) tokens, when LLM_PRICES has the model
    record_drafts: RecordDrafts | None = None
    sleep: Callable[[float], None] = time.sleep  # a try's backoff (tests pass a clock of their own)

    @property
    def project(self) -> str:
        return str(self.spec.project_id)


def project_tasks(client: Any, project_id: int, include: str | None = None) -> Iterator[Any]:
    """Every task of the project, read a page at a time (the SDK's pager fetches the next page lazily);
    `include`: only these fields of each (scope.listed_fields)."""
    yield from client.tasks.list(project=project_id, fields="all", page_size=PAGE, **({"include": include} if include else {}))


@dataclass
class Reading:
    """What reading a project's tasks found so far: tasks read, and those the scope left."""

    seen: int = 0
    skipped: int = 0


def tasks_in_scope(client: Any, spec: JobSpec, version: str, reading: Reading | None = None,
                   out_of_scope: bool = False) -> Iterator[dict[str, Any] | None]:
    """The tasks a job on `spec` pre-labels: those of its scope (pipeline/scope.py) without a prediction
    of `version`, at most `spec.limit` of them, as {"id", "data"}, read a page at a time with only the
    fields the scope needs. Every runner, the Batch API's recording and the estimate read through here.
    `reading` counts the tasks read and those left; `out_of_scope`: a None for each task left (an
    estimate's sample counts them)."""
    reading = reading if reading is not None else Reading()
    taken = 0
    for task in project_tasks(client, spec.project_id, listed_fields(spec.scope, version)):
        if spec.limit is not None and taken >= spec.limit:
            return
        reading.seen += 1
        if not wanted(task, version, spec.scope):
            reading.skipped += 1
            if out_of_scope:
                yield None
            continue
        taken += 1
        yield {"id": int(field_of(task, "id")), "data": dict(field_of(task, "data") or {})}


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
        prelabeler.flush()
