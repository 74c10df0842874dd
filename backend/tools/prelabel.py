"""`llm-ner prelabel`: pre-label a whole Label Studio project from the command line.

The job itself is `pipeline/jobs/` (the same one `POST /jobs` runs inside the backend); this
module adds what a person at a terminal needs: the estimate first (`--dry-run` stops there,
`--max-cost` refuses a job that would cost more), a question before spending above
PRELABEL_CONFIRM_USD, a progress bar, and the failures at the end.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from backend.infra.errors import BackendError
from backend.infra.settings import Settings
from backend.infra.usage import Usage, cost_usd
from backend.llm.batch import BatchAnswers, BatchFileError, BatchLLM, batch_endpoint, request_line
from backend.pipeline.delivery import read_project
from backend.pipeline.jobs.batch import (
    BATCH_DISCOUNT,
    ResultsFile,
    batch_price,
    check_results,
    ingest_results,
    record,
)
from backend.pipeline.jobs.process import Progress
from backend.pipeline.jobs.records import JobSpec
from backend.pipeline.jobs.tries import tasks_in_scope
from backend.protocol.registry import ModelRegistry, load_model_class
from backend.protocol.services import Services
from backend.protocol.start import StartedJob, start_job
from backend.tools.estimate import Estimate, count_message_tokens, count_tokens, estimate_sampled

log = logging.getLogger(__name__)

CONFIRM_CALLS = 1000  # with no price for the model, ask before this many LLM calls
WRITE_PATIENCE = 15.0  # seconds a Ctrl-C waits for the write to Label Studio under way


class PrelabelError(BackendError):
    """The job was refused before it started (cost, no confirmation)."""


@dataclass
class Options:
    dry_run: bool = False
    yes: bool = False
    confirm_usd: float = 1.0
    progress: bool = True
    batch_api: bool = False  # through the provider's Batch API (pipeline/jobs/batch.py)
    batch_file_out: Path | None = None  # write the batch's requests here and stop
    batch_results: Path | None = None  # answers from this results file, then write predictions


def _estimate(model: Any, client: Any, spec: JobSpec, settings: Settings, total: int | None) -> Estimate:
    """What the job would send, from a sample of the tasks (tools/estimate.estimate_sampled): the tasks in
    scope, each with the examples the model would pick for it; one call per text of each target (a
    <Labels> serving two texts asks twice per task); `total` is the project's task count."""
    prelabeler = model.prelabeler(model.model_version)
    targets = {target.key: target for target in model.schema.targets}

    def rows() -> Iterator[dict[str, str] | None]:
        for item in tasks_in_scope(client, spec, model.model_version, out_of_scope=True):
            if item is None:
                yield None
                continue
            data = item["data"]
            yield {key: data[t.data_key] for key, t in targets.items() if isinstance(data.get(t.data_key), str)}

    def examples(key: str, sample: list[str]) -> list:
        # the first task's examples stand for every task's: their number and size vary little
        return list(prelabeler.select_examples(targets[key], sample[0]))

    return estimate_sampled({key: prelabeler.tasks[key] for key in targets}, rows(), total, examples, settings,
                            settings.pack_size, spec.limit)


def run_prelabel(client: Any, spec: JobSpec, settings: Settings, options: Options,
                 ask: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    services = Services.from_settings(settings)
    project = read_project(client, spec.project_id)
    registry = ModelRegistry(load_model_class(), services)
    model = registry.get(str(spec.project_id), project.label_config)
    services.db.save_label_config(str(spec.project_id), project.label_config)
    if options.batch_file_out is not None:
        return write_batch_file(model, client, spec, services, options.batch_file_out, out)
    # a bad results file stops here, before anything is asked or written
    loaded = check_results(options.batch_results) if options.batch_results is not None else None
    needs_estimate = options.dry_run or spec.max_cost is not None or not options.yes
    if needs_estimate:
        figures = _estimate(model, client, spec, settings, getattr(project, "task_number", None))
        print(f"project {spec.project_id}, scope {spec.scope}, model version {model.model_version}", file=out)
        print(figures.describe(), file=out)
        cost = figures.cost_usd
        if options.batch_api and cost is not None:
            print(f"Batch API cost  ${cost * BATCH_DISCOUNT:.4f} (half the synchronous ${cost:.4f}; answers within 24 h)", file=out)
            cost *= BATCH_DISCOUNT
        if options.dry_run:
            return 0
        if spec.max_cost is not None and cost is not None and cost > spec.max_cost:
            raise PrelabelError(f"the estimate (${cost:.4f}) is above --max-cost ${spec.max_cost:g}: nothing was sent")
        big = (cost is not None and cost > options.confirm_usd) or (cost is None and figures.calls > CONFIRM_CALLS)
        if big and not options.yes:
            if not ask.isatty():
                raise PrelabelError("this job is above PRELABEL_CONFIRM_USD: run it with --yes to confirm")
            print("Proceed? [y/N] ", end="", file=out, flush=True)
            if ask.readline().strip().lower() not in ("y", "yes"):
                print("nothing was sent", file=out)
                return 1
    total = getattr(project, "task_number", None)
    if spec.limit is not None and total is not None:
        total = min(total, spec.limit)
    bar = tqdm(total=total, unit="task", desc="pre-labeling", file=sys.stderr, disable=not options.progress)

    def show(progress: Progress) -> None:
        # tasks finished (written, failed for good, or skipped as already pre-labeled), not tasks read:
        # the reader runs far ahead of the LLM. Skipped tasks do not count against a --limit
        finished = progress.done + progress.failed + (progress.skipped if spec.limit is None else 0)
        bar.update(max(0, finished - bar.n))  # update(), not n =: tqdm's rate and ETA come from it
        usage = progress.usage
        bar.set_postfix(done=progress.done, failed=progress.failed, tokens=(usage.prompt_tokens + usage.completion_tokens) if usage else 0,
                        cost=f"${progress.cost_usd:.4f}", refresh=False)
        bar.refresh()

    try:
        started = start_job(services, registry, client, spec, project.label_config, total=total,
                            batch_api=options.batch_api or options.batch_results is not None, on_progress=show,
                            say=lambda message: print(message, file=out, flush=True))
        if started.runner == "batch":
            result = _run_batch(started, spec, options, loaded, client, out)
        elif started.runner == "rq":  # REDIS_URL: the job's parts run on `llm-ner worker` processes
            result = _run_on_queue(services, started, spec, bar, out)
            if result is None:
                return 130
        else:
            print(f"job {started.job_id}: pre-labeling project {spec.project_id} (scope {spec.scope})", file=out, flush=True)
            result = _run_interruptible(started, out)
    finally:
        bar.close()
    _summarize(result, out)
    return 0 if result["state"] == "done" and not result["failed"] else 1


def _summarize(result: dict[str, Any], out: TextIO) -> None:
    print(
        f"job {result['id']} {result['state']}: {result['done']} pre-labeled, {result['failed']} failed, "
        + (f"{result['pending']} pending, " if result.get("pending") else "")
        + f"{result['skipped']} skipped of {result['seen']} read; {result['prompt_tokens']} prompt + "
        f"{result['completion_tokens']} completion tokens, ${result['cost_usd']:.4f}" + (f" ({result['message']})" if result["message"] else ""),
        file=out,
    )
    if result.get("batch"):
        print(describe_batch(result["batch"]), file=out)
    for held in result.get("pending_tasks", [])[:20]:
        print(f"  task {held['task']}: pending, being written by {held['held_by']}", file=out)
    if result.get("pending", 0) > 20:
        print(f"  ... and {result['pending'] - 20} more pending (GET /jobs/{result['id']})", file=out)
    for failure in result["failures"][:20]:
        print(f"  task {failure['task']}: {failure['reason']}", file=out)
    if result["failed"] > 20:
        print(f"  ... and {result['failed'] - 20} more (GET /jobs/{result['id']})", file=out)


class Interrupted(BackendError):
    """Ctrl-C: the job was stopped, or left (a second Ctrl-C) with calls in flight; exit code 130."""

    exit_code = 130


def _run_interruptible(job: StartedJob, out: TextIO, patience: float = WRITE_PATIENCE) -> dict[str, Any]:
    """Run the job in a thread of its own, so that Ctrl-C reaches this one at once: the first says what
    it waits for and stops the job without waiting for its LLM calls in flight (a slow server may take
    minutes to answer them), only for the write to Label Studio under way; a second gives up waiting."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = job.run()
        except BaseException as error:  # handed to the main thread, which reports it
            outcome["error"] = error

    thread = threading.Thread(target=run, name=f"job-{job.job_id}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        print(f"\nCtrl-C: stopping job {job.job_id}. The LLM calls in flight are abandoned (a next run asks those tasks "
              f"again); waiting up to {patience:.0f} s for the write to Label Studio under way. Ctrl-C again quits now.",
              file=out, flush=True)
        job.interrupt("interrupted (Ctrl-C)")
        try:
            thread.join(patience)
        except KeyboardInterrupt:
            raise Interrupted(f"job {job.job_id} left at a second Ctrl-C; a next run resumes it") from None
        if thread.is_alive():
            raise Interrupted(f"job {job.job_id}: Label Studio did not answer the write under way within {patience:.0f} s; "
                              "left as it is (a next run resumes it)") from None
        if "result" in outcome:
            _summarize(outcome["result"], out)
        raise Interrupted(f"job {job.job_id} stopped at Ctrl-C; a next run pre-labels what is left") from None
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _run_on_queue(services: Services, started: StartedJob, spec: JobSpec, bar: tqdm, out: TextIO,
                  poll: float = 0.5) -> dict[str, Any] | None:
    """Hand the project's tasks to the queue part by part, then follow the job until its last part
    ends; None when interrupted (Ctrl-C: the workers go on with what was handed over)."""
    queue, job_id = services.job_queue, started.job_id
    print(f"job {job_id}: pre-labeling project {spec.project_id} (scope {spec.scope}) on the RQ queue "
          f"{queue.queue.name!r}: `llm-ner worker` processes run it", file=out, flush=True)
    try:
        started.run()  # hands the tasks in scope to the queue
        for polls in itertools.count():
            if polls % 10 == 0:
                queue.reconcile(services.jobs, job_id)  # parts Redis lost end the job as failed
            job = services.jobs.get(job_id) or {}
            bar.update(max(0, job.get("done", 0) + job.get("failed", 0) + job.get("skipped", 0) - bar.n))
            bar.set_postfix(done=job.get("done"), failed=job.get("failed"), tokens=job.get("prompt_tokens", 0) + job.get("completion_tokens", 0),
                            cost=f"${job.get('cost_usd', 0):.4f}", refresh=False)
            bar.refresh()
            if job.get("state") != "running":
                return job
            time.sleep(poll)
    except KeyboardInterrupt:
        print(f"job {job_id} goes on in the workers (DELETE /jobs/{job_id} cancels it)", file=out)
        return None


def describe_batch(batch: dict[str, Any]) -> str:
    lines = [f"Batch API: {batch['batches']} batch(es), {batch['requests']} requests: {batch['answered']} answered"
             + (f", {batch['failed']} failed and {batch['unfinished']} unfinished, sent synchronously"
                if batch["failed"] or batch["unfinished"] else "")
             + f"; {batch['prompt_tokens']} prompt + {batch['completion_tokens']} completion tokens"]
    if batch["cost_usd"] is not None:
        saved = batch["sync_cost_usd"] - batch["cost_usd"]
        lines[0] += f", ${batch['cost_usd']:.4f} at the batch price (synchronous: ${batch['sync_cost_usd']:.4f}, saved ${saved:.4f})"
    lines += [f"  {message}" for message in batch["messages"][:10]]
    return "\n".join(lines)


def _run_batch(started: StartedJob, spec: JobSpec, options: Options, loaded: ResultsFile | None, client: Any,
               out: TextIO) -> dict[str, Any]:
    batch, recorder = started.batch, started.recorder
    print(f"job {batch.job.job_id}: pre-labeling project {spec.project_id} (scope {spec.scope}) through the Batch API", file=out)
    if loaded is None:
        return started.run()
    # which requests the tasks in scope still need (or that a batch answered): the lines to take
    recorder.llm.sink = lambda custom_id, body: None
    record(recorder, tasks_in_scope(client, spec, batch.version))
    needed = recorder.llm.deferred | recorder.llm.replayed
    figures = ingest_results(loaded, needed, batch.job, batch.answers, batch.batches)
    print(f"{options.batch_results}: {figures['lines']} lines, {figures['answered']} answers and {figures['failed']} "
          f"failed lines for the tasks in scope", file=out)
    if figures["duplicates"]:
        print(f"{figures['duplicates']} lines name a request an earlier line named: each request counted once "
              f"(its first answer kept)", file=out)
    if figures["unmatched"]:
        print(f"{figures['unmatched']} lines match no request still to answer for the tasks in scope (another project, "
              f"prompt, examples or model, or already answered): not used", file=out)
    return batch.write()


def write_batch_file(model: Any, client: Any, spec: JobSpec, services: Services, path: Path, out: TextIO) -> int:
    """`--batch-file-out`: the batch's requests as one JSONL file (OpenAI's batch input format, which
    `vllm run-batch` reads), with the number of requests and the estimated cost; sends nothing."""
    settings = services.settings
    url = batch_endpoint(settings.openai_base_url, settings.llm_batch_endpoint)
    usage = Usage()
    try:
        handle = path.open("wb")
    except OSError as error:
        raise BatchFileError(f"cannot write {path}: {error.strerror or error}") from None

    def unwritable(error: OSError) -> BatchFileError:
        return BatchFileError(f"cannot write {path}: {error.strerror or error}")

    def sink(custom_id: str, body: dict[str, Any]) -> None:
        try:
            handle.write(request_line(custom_id, body, url))
        except OSError as error:  # a full disk: one line naming the file
            raise unwritable(error) from None
        # the estimate's counts (tools/estimate.py): an answer about a third of the text's tokens
        usage.add(Usage(count_message_tokens(body["messages"], body["model"]),
                        count_tokens(body["messages"][-1].get("content") or "", body["model"]) // 3, 1))

    try:
        llm = BatchLLM(services.llm, BatchAnswers(services.db), sink=sink)
        recorded = record(model.prelabeler(model.model_version, llm=llm), tasks_in_scope(client, spec, model.model_version))
    finally:
        try:
            handle.close()  # writes what is still buffered: where a full disk shows with a small file
        except OSError as error:
            raise unwritable(error) from None
    price = services.price
    cost = cost_usd(usage, batch_price(price))
    print(f"{usage.calls} requests for {recorded.deferred} tasks written to {path} ({recorded.answered} tasks answered "
          f"already, {recorded.other} that cannot be asked); ~{usage.prompt_tokens} prompt + ~{usage.completion_tokens} "
          f"completion tokens", file=out)
    if cost is None:
        print("estimated cost: unknown (no LLM_PRICES entry for this model)", file=out)
    else:
        print(f"estimated cost: ${cost:.4f} at the Batch API's half price (synchronous: ${cost_usd(usage, price):.4f})", file=out)
    print(f"then: llm-ner prelabel --project {spec.project_id} --batch-results RESULTS.jsonl", file=out)
    return 0
