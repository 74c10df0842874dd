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
from backend.learning.labelstudio import describe_error
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
from backend.pipeline.jobs.process import ProjectJob
from backend.pipeline.jobs.records import Jobs
from backend.pipeline.jobs.tries import tasks_in_scope
from backend.pipeline.prelabel import Prelabeler, TaskOutcome, task_text

log = logging.getLogger(__name__)

RECORD_NOTE = 500  # tasks between two heartbeats of a job recording its requests
INGEST_ROWS = 200  # result lines stored at once (parsed, a line takes a few times its size in memory)
DOWNLOAD_BLOCK = 1 << 20  # bytes read or downloaded at once
BATCH_DISCOUNT = 0.5  # OpenAI's and Azure OpenAI's Batch API: half the price of the same synchronous call


def batch_price(price: tuple[float, float] | None) -> tuple[float, float] | None:
    return None if price is None else (price[0] * BATCH_DISCOUNT, price[1] * BATCH_DISCOUNT)


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
    prelabeler.flush()
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


@dataclass
class Tally:
    """A batch's result lines as they are stored: each request id counted once (a file naming one twice
    has its first answer kept, or its answer when an earlier line of it failed)."""

    lines: int = 0
    answered: int = 0
    failed: int = 0
    duplicates: int = 0  # lines naming a request id an earlier line named
    usage: Usage = field(default_factory=Usage)
    seen: dict[str, bool] = field(default_factory=dict, repr=False)  # request id -> answered

    def take(self, results: Iterable[ResultLine]) -> Iterator[ResultLine]:
        """The lines to store, counted; a duplicate is only counted, unless it answers a request an earlier
        line failed (the store keeps an answer over a failure, never the other way round)."""
        for line in results:
            self.lines += 1
            before = self.seen.get(line.custom_id)
            if before is not None:
                self.duplicates += 1
                if before or not line.answered:
                    continue
                self.failed -= 1
            self.seen[line.custom_id] = line.answered
            if line.answered:
                self.answered += 1
                self.usage.add(usage_of_answer(line.body or {}))
            else:
                self.failed += 1
            yield line


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

    def ingest(self, answers: BatchAnswers, batch_id: str, status: str, results: Iterable[ResultLine],
               price: tuple[float, float] | None, describe: Callable[[Tally], str] = lambda tally: "") -> tuple[Tally, bool]:
        """Store a finished batch's lines and figures, once: (its tally, whether this call ingested it, i.e.
        whether its usage is still to be accounted). The lines are taken as they come and stored
        INGEST_ROWS at a time (memory stays flat in the file's size); `describe(tally)` is the batch's
        message once they are all in."""
        tally = Tally()
        with self.db.transaction() as conn:
            phase = conn.execute("SELECT phase FROM llm_batches WHERE id=?", (batch_id,)).fetchone()
            if phase is not None and phase[0] != "submitted":
                return tally, False
            rows: list[ResultLine] = []
            for line in tally.take(results):
                rows.append(line)
                if len(rows) >= INGEST_ROWS:
                    answers.put(conn, batch_id, rows)
                    rows = []
            if rows:
                answers.put(conn, batch_id, rows)
            usage = tally.usage
            conn.execute(
                "UPDATE llm_batches SET status=?, phase='ingested', message=?, answered=?, failed=?, prompt_tokens=?, "
                "completion_tokens=?, cost_usd=?, sync_cost_usd=?, updated_at=? WHERE id=?",
                (status, describe(tally), tally.answered, tally.failed, usage.prompt_tokens, usage.completion_tokens,
                 cost_usd(usage, batch_price(price)), cost_usd(usage, price), time.time(), batch_id),
            )
        return tally, True

    def requests(self, batch_id: str, requests: int) -> None:
        """A results file's batch: its requests are known once its lines are matched."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE llm_batches SET requests=? WHERE id=?", (requests, batch_id))

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
            why = describe_api_error(error) if isinstance(error, openai.OpenAIError) else describe_error(error)
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
                    metadata={"project": self.project, "job": self.job.job_id, "file": str(number)},
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
                step = min(self.poll_seconds - waited, jobs.heartbeat / 4)  # a long poll keeps the job's heartbeat
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
        with tempfile.TemporaryDirectory(prefix="llm-ner-results-") as directory:
            # downloaded to disk, then read a line at a time: a 200 MB output file never sits in memory
            paths = [download(self.provider, file_id, Path(directory))
                     for file_id in (batch.output_file_id, batch.error_file_id) if file_id]

            def lines() -> Iterator[ResultLine]:
                for path in paths:
                    for line in result_lines(path, skip_bad=True):
                        # a line the batch never ran (expired or cancelled before it) is unfinished, not failed
                        if not line.error.startswith(("batch_expired", "batch_cancelled")):
                            yield line

            def describe(tally: Tally) -> str:
                if batch.status != "completed":
                    errors = getattr(getattr(batch, "errors", None), "data", None) or []
                    why = "; ".join(f"{e.code}: {e.message}" for e in errors[:3] if e is not None)
                    return f"{batch.status}" + (f" ({why})" if why else "") + f": {tally.answered} of {row['requests']} answered"
                return f"{tally.failed} of {row['requests']} lines failed" if tally.failed else ""

            tally, first = self.batches.ingest(self.answers, row["id"], batch.status, lines(), self.job.price, describe)
        if first:
            self.job.ledger.account(self.project, 0, tally.usage, batch_price(self.job.price))
        if tally.duplicates:
            log.warning("batch %s: %d lines name a request another line named: counted once", row["id"], tally.duplicates)
        self.say(f"batch {row['id']} {batch.status}: {tally.answered} answered, {row['requests'] - tally.answered} left to the synchronous API")

    def _cancelled(self) -> dict[str, Any]:
        jobs, job_id = self.job.jobs, self.job.job_id
        jobs.finish(job_id, "cancelled", "cancelled on request (its batches too)")
        return jobs.get(job_id) or {}


def download(provider: Any, file_id: str, directory: Path) -> Path:
    """A provider's file, streamed to disk a block at a time."""
    path = directory / f"{file_id}.jsonl"
    with provider.files.with_streaming_response.content(file_id) as response, path.open("wb") as out:
        for block in response.iter_bytes(DOWNLOAD_BLOCK):
            out.write(block)
    return path


def result_lines(path: Path, skip_bad: bool = False) -> Iterator[ResultLine]:
    """The result lines of a file, read one at a time. A line that cannot be read raises BatchFileError
    naming the file and line, or with `skip_bad` is logged and costs that line only (a provider's file)."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise BatchFileError(f"cannot read {path}: {error.strerror or error}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                if skip_bad:
                    log.warning("%s line %d: not UTF-8 text", path.name, number)
                    continue
                raise BatchFileError(f"{path} is not UTF-8 text (a batch results file is JSON Lines)") from None
            if not text.strip():
                continue
            try:
                yield parse_result_line(text, f"{path.name} line {number}")
            except BatchFileError as error:
                if not skip_bad:
                    raise
                log.warning("%s", error)


@dataclass
class ResultsFile:
    """A results file the user brings, checked: every line readable, with an id (a hash of its bytes) so
    the same file ingested twice is accounted once."""

    path: Path
    file_id: str
    lines: int
    duplicates: int  # lines naming a request id an earlier line named


def check_results(path: Path) -> ResultsFile:
    """A results file (OpenAI's batch output format, as `vllm run-batch` writes it), read a line at a time
    and checked before anything is stored or asked; memory stays flat in its size but for its request ids."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(DOWNLOAD_BLOCK), b""):
                digest.update(block)
    except OSError as error:
        raise BatchFileError(f"cannot read {path}: {error.strerror or error}") from None
    tally = Tally()
    for _ in tally.take(result_lines(path)):
        pass
    if not tally.lines:
        raise BatchFileError(f"{path} holds no result lines")
    return ResultsFile(path, "file-" + digest.hexdigest()[:24], tally.lines, tally.duplicates)


def ingest_results(results: ResultsFile, needed: set[str], job: ProjectJob, answers: BatchAnswers,
                   batches: Batches) -> dict[str, int]:
    """Store the lines of a results file that answer a request of the tasks in scope (`needed`); the
    others are counted, not stored. Accounted at the batch price, once per file, each request once."""
    project = str(job.spec.project_id)
    unmatched = 0

    def matched() -> Iterator[ResultLine]:
        nonlocal unmatched
        for line in result_lines(results.path):
            if line.custom_id in needed:
                yield line
            else:
                unmatched += 1

    batches.add(results.file_id, project, job.version, job.job_id, None, 0, "completed")
    tally, first = batches.ingest(answers, results.file_id, "completed", matched(), job.price,
                                  lambda t: f"{t.failed} of {t.answered + t.failed} requests failed" if t.failed else "")
    if first:
        batches.requests(results.file_id, tally.answered + tally.failed)
        job.ledger.account(project, 0, tally.usage, batch_price(job.price))
    return {"lines": results.lines, "matched": tally.answered + tally.failed, "unmatched": unmatched,
            "answered": tally.answered, "failed": tally.failed, "duplicates": results.duplicates}
