"""One way to start a project job, for `POST /jobs`, the backend's resume of Batch API jobs and `llm-ner prelabel`:
the runner is chosen here, once. It lives in protocol/ because it needs the model registry (the project's
model object makes the job's pre-labeler, examples and model_version)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backend.infra.errors import BadRequest
from backend.pipeline.jobs.batch import BatchJob
from backend.pipeline.jobs.records import JobSpec
from backend.pipeline.prelabel import Prelabeler
from backend.protocol.registry import ModelRegistry
from backend.protocol.services import Services

RUNNERS = ("process", "rq", "batch")


@dataclass
class StartedJob:
    """A job whose record exists, to be run where its starter wants: a thread of the backend, or the
    foreground of the command line."""

    job_id: str
    runner: str  # one of RUNNERS
    # process: the whole job; rq: hands the tasks in scope to the queue (`llm-ner worker` runs them);
    # batch: record, submit, poll, write. Each returns the job's record.
    run: Callable[[], dict[str, Any]]
    interrupt: Callable[[str], None] | None = None  # the in-process runners: end now (Ctrl-C)
    batch: BatchJob | None = None  # the Batch API runner's job, and the pre-labeler that records its requests
    recorder: Prelabeler | None = None


def start_job(services: Services, registry: ModelRegistry, client: Any, spec: JobSpec, label_config: str, *,
              total: int | None = None, batch_api: bool = False, on_progress: Callable[[Any], None] | None = None,
              say: Callable[[str], None] | None = None) -> StartedJob:
    """The job's record, and how to run it: through the provider's Batch API when asked; else on RQ
    with REDIS_URL (parts that `llm-ner worker` processes run on any host); else in this process.
    BadRequest (501) for a model class that runs no such job; JobRunning / TooManyJobs as `Jobs.create`."""
    model = registry.get(str(spec.project_id), label_config)
    if not hasattr(model, "prelabel_project"):
        raise BadRequest(f"{type(model).__name__} does not run project jobs", status=501)
    if batch_api:  # pipeline/jobs/batch.py
        if not hasattr(model, "batch_project"):
            raise BadRequest(f"{type(model).__name__} does not run Batch API jobs", status=501)
        batch, recorder = model.batch_project(client, spec, total=total, on_progress=on_progress,
                                              say=say or (lambda message: None))
        return StartedJob(batch.job.job_id, "batch", lambda: batch.run(recorder), batch.job.interrupt, batch, recorder)
    queue = services.job_queue
    if queue is not None:  # REDIS_URL
        version = model.model_version
        job_id = queue.start(services.db, services.jobs, spec, version, label_config, total)
        return StartedJob(job_id, "rq", lambda: queue.plan(services.jobs, job_id, spec, client, version))
    job = model.prelabel_project(client, spec, total=total, on_progress=on_progress)
    return StartedJob(job.job_id, "process", job.run, job.interrupt)
