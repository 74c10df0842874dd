"""A project job through the provider's Batch API: the same predictions, at half the price, within 24 h.

1. Record: the pipeline runs over the tasks in scope with an LLM client that defers (llm/batch.py):
   each chat-completions body it would send, exactly, becomes a line of a JSONL input file (a task
   answered in the response cache sends nothing). Files are split at the provider's limits
   (BATCH_MAX_REQUESTS, BATCH_MAX_BYTES).
2. Submit: each file is uploaded (`files.create(purpose="batch")`) and a batch created
   (`batches.create(endpoint=..., completion_window="24h")`); the batch ids go into the store at
   once, so a restarted job (the same command again, or the backend with the job pending) polls them
   instead of sending a second batch.
3. Poll every BATCH_POLL_SECONDS until every batch is completed, expired, failed or cancelled, then
   download its output and error files into the store (`llm_batch_answers`) and account the
   answered lines' usage at half the LLM_PRICES price.
4. Write: the ordinary ProjectJob runs with an LLM client that replays those answers: no call for an
   answered line; a line that failed in the batch, or that an expired or failed batch never
   finished, and any request beyond the first round (a repair turn) are sent synchronously, and a
   task that still fails is reported with its reason like any job's.

`--batch-file-out` stops after step 1 (one file, for `vllm run-batch` or another provider), and
`--batch-results` replaces steps 2-3 with a results file the user brings.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import openai

from backend.infra.usage import Usage, cost_usd
from backend.llm.batch import (
    TERMINAL,
    BatchAnswers,
    BatchFileError,
    Deferred,
    ResultLine,
    parse_result_line,
    request_line,
    usage_of_answer,
)
from backend.llm.client import describe_api_error
from backend.pipeline.jobs import HEARTBEAT, Jobs, JobSpec, ProjectJob, project_tasks
from backend.pipeline.prelabel import Prelabeler, TaskOutcome, task_text
from backend.pipeline.scope import field_of, wanted

log = logging.getLogger(__name__)

RECORD_NOTE = 500  # tasks between two heartbeats of a job recording its requests
BATCH_DISCOUNT = 0.5  # OpenAI's and Azure OpenAI's Batch API: half the price of the same synchronous call


def batch_price(price: tuple[float, float] | None) -> tuple[float, float] | None:
    return None if price is None else (price[0] * BATCH_DISCOUNT, price[1] * BATCH_DISCOUNT)


def tasks_in_scope(client: Any, spec: JobSpec, version: str) -> Iterator[dict[str, Any]]:
    """The tasks the job would pre-label ({"id", "data"}), read a page at a time."""
    taken = 0
    for task in project_tasks(client, spec.project_id):
        if spec.limit is not None and taken >= spec.limit:
            return
        if wanted(task, version, spec.scope):
            taken += 1
            yield {"id": int(field_of(task, "id")), "data": dict(field_of(task, "data") or {})}


class RequestFiles:
    """Request lines into JSONL files, a new file before one would pass the per-batch limits."""

    def __init__(self, directory: Path, url: str, max_requests: int, max_bytes: int, name: str = "requests"):
        self.directory, self.url, self.name = directory, url, name
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.files: list[tuple[Path, int]] = []  # (file, lines)
        self._out: BinaryIO | None = None
        self._lines = self._bytes = 0

    def add(self, custom_id: str, body: dict[str, Any]) -> None:
        line = request_line(custom_id, body, self.url)
        if len(line) > self.max_bytes:
            raise BatchFileError(f"one request is {len(line)} bytes, more than a batch file may hold ({self.max_bytes})")
        if self._out is None or self._lines >= self.max_requests or self._bytes + len(line) > self.max_bytes:
            self._next()
        assert self._out is not None
        self._out.write(line)
        self._lines += 1
        self._bytes += len(line)
        self.files[-1] = (self.files[-1][0], self._lines)

    def _next(self) -> None:
        self.close()
        path = self.directory / f"{self.name}-{len(self.files) + 1}.jsonl"
        self._out = path.open("wb")
        self._lines = self._bytes = 0
        self.files.append((path, 0))

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    @property
    def requests(self) -> int:
        return sum(n for _, n in self.files)


@dataclass
class Recorded:
    tasks: int = 0  # tasks in scope
    answered: int = 0  # tasks whose every request was answered already (cache or batch store)
    deferred: int = 0  # tasks waiting for the batch
    other: int = 0  # tasks that failed for another reason (bad data...): the job reports them


def record(prelabeler: Prelabeler, tasks: Iterable[dict[str, Any]], every: Callable[[Recorded], None] | None = None) -> Recorded:
    """Run the pipeline over the tasks with a deferring BatchLLM (its sink receives the requests);
    `every` hears of the figures every RECORD_NOTE tasks."""
    figures = Recorded()
    for task in tasks:
        figures.tasks += 1
        if every is not None and figures.tasks % RECORD_NOTE == 0:
            every(figures)
        deferred = failed = False
        for target in prelabeler.schema.targets:  # each <Labels> target's requests, not only the first's
            try:
                text = task_text(task["data"], target)
                if text.strip():
                    prelabeler.aligned(target, text, TaskOutcome())
            except Deferred:
                deferred = True
            except BatchFileError:  # the requests file cannot be written (a full disk): no task can be
                raise
            except Exception as error:
                log.info("task %s: not in the batch (%s)", task["id"], error)
                failed = True
        if deferred:
            figures.deferred += 1
        elif failed:
            figures.other += 1
        else:
            figures.answered += 1
    prelabeler.source.flush()
    return figures


@dataclass
class BatchFigures:
    batches: int = 0
    requests: int = 0
    answered: int = 0
    failed: int = 0  # lines the batch answered with an error (retried synchronously)
    unfinished: int = 0  # lines an expired, failed or cancelled batch never answered (the same)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    sync_cost_usd: float | None = None
    messages: list[str] = field(default_factory=list)

    def add_row(self, row: dict[str, Any]) -> None:
        self.batches += 1
        self.requests += row["requests"]
        self.answered += row["answered"]
        self.failed += row["failed"]
        self.unfinished += max(0, row["requests"] - row["answered"] - row["failed"])
        self.prompt_tokens += row["prompt_tokens"]
        self.completion_tokens += row["completion_tokens"]
        if row["cost_usd"] is not None:
            self.cost_usd = (self.cost_usd or 0.0) + row["cost_usd"]
            self.sync_cost_usd = (self.sync_cost_usd or 0.0) + (row["sync_cost_usd"] or 0.0)
        if row["message"]:
            self.messages.append(f"batch {row['id']}: {row['message']}")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class Batches:
    """The store's record of a project's batches: `submitted` (at the provider), `ingested` (answers in
    the store, usage accounted), `used` (its tasks written by a job that finished)."""

    def __init__(self, db: Any):
        self.db = db

    def add(self, batch_id: str, project: str, version: str, job_id: str, input_file_id: str | None, requests: int,
            status: str, phase: str = "submitted") -> bool:
        now = time.time()
        with self.db.transaction() as conn:
            added = conn.execute(
                "INSERT INTO llm_batches(id, project_id, model_version, job_id, input_file_id, requests, status, phase, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                (batch_id, project, version, job_id, input_file_id, requests, status, phase, now, now),
            ).rowcount
        return bool(added)

    def of(self, project: str, version: str, phase: str) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT * FROM llm_batches WHERE project_id=? AND model_version=? AND phase=? ORDER BY created_at, id",
            (project, version, phase),
        )
        return [dict(r) for r in rows]

    def pending_projects(self) -> list[tuple[str, str, str]]:
        """(project, model_version, job_id) of every batch still at the provider: a backend resumes them."""
        rows = self.db.query(
            "SELECT project_id, model_version, MAX(job_id) AS job_id FROM llm_batches WHERE phase='submitted' "
            "GROUP BY project_id, model_version"
        )
        return [(r["project_id"], r["model_version"], r["job_id"]) for r in rows]

    def status(self, batch_id: str, status: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("UPDATE llm_batches SET status=?, updated_at=? WHERE id=?", (status, time.time(), batch_id))

    def ingest(self, answers: BatchAnswers, batch_id: str, status: str, results: list[ResultLine], message: str,
               price: tuple[float, float] | None) -> tuple[Usage, bool]:
        """Store a finished batch's lines and figures, once: (the answered lines' usage, whether this
        call ingested it, i.e. whether its usage is still to be accounted)."""
        usage = Usage()
        answered = [r for r in results if r.answered]
        for r in answered:
            usage.add(usage_of_answer(r.body or {}))
        failed = len(results) - len(answered)
        with self.db.transaction() as conn:
            phase = conn.execute("SELECT phase FROM llm_batches WHERE id=?", (batch_id,)).fetchone()
            if phase is not None and phase[0] != "submitted":
                return usage, False
            answers.put(conn, batch_id, results)
            conn.execute(
                "UPDATE llm_batches SET status=?, phase='ingested', message=?, answered=?, failed=?, prompt_tokens=?, "
                "completion_tokens=?, cost_usd=?, sync_cost_usd=?, updated_at=? WHERE id=?",
                (status, message, len(answered), failed, usage.prompt_tokens, usage.completion_tokens,
                 cost_usd(usage, batch_price(price)), cost_usd(usage, price), time.time(), batch_id),
            )
        return usage, True

    def used(self, batch_ids: list[str]) -> None:
        with self.db.transaction() as conn:
            conn.executemany("UPDATE llm_batches SET phase='used', updated_at=? WHERE id=?", [(time.time(), b) for b in batch_ids])


def note(jobs: Jobs, job_id: str, message: str) -> None:
    """What the job is waiting for, in its record (`GET /jobs/<id>`), and a heartbeat: a job polling
    a batch for hours is alive."""
    with jobs.db.transaction() as conn:
        conn.execute("UPDATE jobs SET message=?, heartbeat_at=? WHERE id=?", (jobs.secrets.mask(message), time.time(), job_id))


class BatchJob:
    """Steps 1-4 of the module docstring for one ProjectJob. `recorder` is a Prelabeler on a deferring
    BatchLLM whose sink is `self.sink`; `job` runs with a replaying one."""

    def __init__(
        self,
        job: ProjectJob,
        provider: Any,  # an openai.OpenAI (or AzureOpenAI) client with its own retries
        answers: BatchAnswers,
        batches: Batches,
        url: str,
        poll_seconds: float,
        max_requests: int,
        max_bytes: int,
        say: Callable[[str], None] = lambda message: None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.job, self.provider, self.answers, self.batches = job, provider, answers, batches
        self.url, self.poll_seconds, self.max_requests, self.max_bytes = url, poll_seconds, max_requests, max_bytes
        self.say, self.sleep = say, sleep
        self.project, self.version = str(job.spec.project_id), job.version
        self.files: RequestFiles | None = None

    def sink(self, custom_id: str, body: dict[str, Any]) -> None:
        assert self.files is not None, "the recorder runs inside submit()"
        self.files.add(custom_id, body)

    def run(self, recorder: Prelabeler) -> dict[str, Any]:
        jobs, job_id = self.job.jobs, self.job.job_id
        try:
            if not self.batches.of(self.project, self.version, "submitted"):
                self.submit(recorder)
            if not self.poll():
                return self._cancelled()
        except Exception as error:
            # describe_api_error: a provider's 401 echoes part of the key, never repeated
            why = describe_api_error(error) if isinstance(error, openai.OpenAIError) else f"{type(error).__name__}: {str(error)[:300]}"
            log.warning("job %s: batch stage failed: %s", job_id, why)
            jobs.finish(job_id, "failed", f"Batch API: {why}")
            return jobs.get(job_id) or {}
        return self.write()

    def write(self) -> dict[str, Any]:
        """Step 4: the ordinary job, answered from the ingested batches (and synchronously for the rest)."""
        jobs, job_id = self.job.jobs, self.job.job_id
        figures = BatchFigures()
        ingested = self.batches.of(self.project, self.version, "ingested")
        for row in ingested:
            figures.add_row(row)
        # the batch's usage and cost count in this job's figures (the ledger has them already)
        self.job.progress.usage.add(Usage(figures.prompt_tokens, figures.completion_tokens, figures.answered))
        self.job.progress.cost_usd += figures.cost_usd or 0.0
        note(jobs, job_id, "writing predictions")
        result = self.job.run()
        if result.get("state") == "done" and ingested:
            ids = [row["id"] for row in ingested]
            self.batches.used(ids)
            self.answers.forget(ids)  # the answers are in the response cache now
        result["batch"] = figures.to_json()
        return result

    def submit(self, recorder: Prelabeler) -> None:
        spec = self.job.spec
        with tempfile.TemporaryDirectory(prefix="llm-ner-batch-") as directory:
            self.files = RequestFiles(Path(directory), self.url, self.max_requests, self.max_bytes)
            try:
                recorded = record(recorder, tasks_in_scope(self.job.client, spec, self.version),
                                  every=lambda r: note(self.job.jobs, self.job.job_id, f"recording requests: {r.tasks} tasks read"))
            finally:
                self.files.close()
            self.say(
                f"{recorded.tasks} tasks in scope: {recorded.answered} answered already, {recorded.deferred} "
                f"need {self.files.requests} requests in {len(self.files.files)} batch(es)"
            )
            for number, (path, lines) in enumerate(self.files.files, start=1):
                with path.open("rb") as handle:
                    uploaded = self.provider.files.create(file=(path.name, handle), purpose="batch")
                batch = self.provider.batches.create(
                    input_file_id=uploaded.id, endpoint=self.url, completion_window="24h",
                    metadata={"project": self.project, "job": self.job.job_id, "part": str(number)},
                )
                # stored before anything else can fail: a restart polls this batch, never sends another
                self.batches.add(batch.id, self.project, self.version, self.job.job_id, uploaded.id, lines, batch.status)
                self.say(f"batch {batch.id}: {lines} requests submitted")
            self.files = None

    def poll(self) -> bool:
        """Wait for every submitted batch of the project to end, ingesting each; False when the job was
        cancelled meanwhile (its batches are cancelled at the provider too)."""
        jobs, job_id = self.job.jobs, self.job.job_id
        while True:
            open_batches = self.batches.of(self.project, self.version, "submitted")
            if not open_batches:
                return True
            states = []
            for row in open_batches:
                batch = self.provider.batches.retrieve(row["id"])
                if batch.status in TERMINAL:
                    self.ingest(row, batch)
                else:
                    if batch.status != row["status"]:
                        self.batches.status(row["id"], batch.status)
                    counts = batch.request_counts
                    done = f" {counts.completed + counts.failed}/{counts.total}" if counts is not None else ""
                    states.append(f"{row['id']} {batch.status}{done}")
            if not states:
                continue
            message = "Batch API: " + ", ".join(states)
            note(jobs, job_id, message)
            waited = 0.0
            while waited < self.poll_seconds and not jobs.cancel_requested(job_id):
                step = min(self.poll_seconds - waited, HEARTBEAT / 4)  # a long poll keeps the job's heartbeat
                self.sleep(step)
                waited += step
                note(jobs, job_id, message)
            if jobs.cancel_requested(job_id):
                for row in self.batches.of(self.project, self.version, "submitted"):
                    try:
                        self.provider.batches.cancel(row["id"])
                    except Exception as error:
                        log.warning("batch %s: could not cancel it: %s", row["id"], error)
                return False

    def ingest(self, row: dict[str, Any], batch: Any) -> None:
        results: list[ResultLine] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                content = self.provider.files.content(file_id)
                for number, raw in enumerate(content.text.splitlines(), start=1):
                    if raw.strip():
                        try:
                            results.append(parse_result_line(raw, f"file {file_id} line {number}"))
                        except BatchFileError as error:  # one unreadable line costs that line, not the batch
                            log.warning("%s", error)
        # a line the batch never ran (expired or cancelled before it) is unfinished, not failed
        results = [r for r in results if not r.error.startswith(("batch_expired", "batch_cancelled"))]
        answered = sum(1 for r in results if r.answered)
        message = ""
        if batch.status != "completed":
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            why = "; ".join(f"{e.code}: {e.message}" for e in errors[:3] if e is not None)
            message = f"{batch.status}" + (f" ({why})" if why else "") + f": {answered} of {row['requests']} answered"
        failed = len(results) - answered
        if failed and not message:
            message = f"{failed} of {row['requests']} lines failed"
        usage, first = self.batches.ingest(self.answers, row["id"], batch.status, results, message, self.job.price)
        if first:
            self.job.ledger.account(self.project, 0, usage, batch_price(self.job.price))
        self.say(f"batch {row['id']} {batch.status}: {answered} answered, {row['requests'] - answered} left to the synchronous API")

    def _cancelled(self) -> dict[str, Any]:
        jobs, job_id = self.job.jobs, self.job.job_id
        jobs.finish(job_id, "cancelled", "cancelled on request (its batches too)")
        return jobs.get(job_id) or {}


def load_results(path: Path) -> tuple[str, list[ResultLine]]:
    """A results file (OpenAI's batch output format, as `vllm run-batch` writes it), read whole and
    checked line by line before anything is stored; with an id for it (a hash of its bytes), so the
    same file ingested twice is accounted once."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BatchFileError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BatchFileError(f"{path} is not UTF-8 text (a batch results file is JSON Lines)") from None
    results = [parse_result_line(raw, f"{path.name} line {n}") for n, raw in enumerate(text.splitlines(), 1) if raw.strip()]
    if not results:
        raise BatchFileError(f"{path} holds no result lines")
    return "file-" + hashlib.sha256(data).hexdigest()[:24], results


def ingest_results(batch_id: str, results: list[ResultLine], needed: set[str], job: ProjectJob, answers: BatchAnswers,
                   batches: Batches) -> dict[str, int]:
    """Store the lines of a results file that answer a request of the tasks in scope (`needed`); the
    others are counted, not stored. Accounted at the batch price, once per file."""
    project = str(job.spec.project_id)
    matched = [r for r in results if r.custom_id in needed]
    failed = sum(1 for r in matched if not r.answered)
    batches.add(batch_id, project, job.version, job.job_id, None, len(matched), "completed")
    usage, first = batches.ingest(answers, batch_id, "completed", matched,
                                  f"{failed} of {len(matched)} lines failed" if failed else "", job.price)
    if first:
        job.ledger.account(project, 0, usage, batch_price(job.price))
    return {"lines": len(results), "matched": len(matched), "unmatched": len(results) - len(matched),
            "answered": len(matched) - failed, "failed": failed}
