"""The RQ queue a project job's parts go to (rq's `Queue`): enqueue, cancel, and the parts Redis lost.
The worker process that runs them is protocol/rqworker.py (it needs the model registry)."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from redis import Redis
from redis.exceptions import RedisError
from rq import Callback, Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from backend.infra.errors import BackendError, ConfigError
from backend.infra.settings import Settings
from backend.infra.storage import Database
from backend.pipeline.jobs.parts import plan_parts
from backend.pipeline.jobs.records import Jobs, JobSpec

log = logging.getLogger(__name__)

QUEUE = "llm-ner"
PART_RETRIES = 3  # runs of a part after its first (a dead worker, Label Studio down...)
PART_TIMEOUT = 3600  # seconds: RQ stops a part that runs longer (its tasks' LLM calls have their own timeouts)


def redis_connection(settings: Settings) -> Redis:
    if settings.redis_url is None:
        raise ConfigError("set REDIS_URL to run project jobs on RQ")
    # redis-py 8 gives up reading a socket after 5 s by default, and a worker waits on the queue (BLMOVE)
    # up to a heartbeat: a connection made with that default (the first ping's, say) and later lent to
    # a wait failed it over and over, the worker backing off up to a minute with parts on the queue
    return Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=settings.worker_heartbeat + 15,
                          socket_connect_timeout=10)


def redis_place(settings: Settings) -> str:
    """Where Redis is, for messages: host and port, never the password in the URL."""
    url = urlsplit(settings.redis_url.get_secret_value()) if settings.redis_url else None
    return f"{url.hostname}:{url.port or 6379}" if url and url.hostname else "the REDIS_URL socket"


def part_job_id(job_id: str, part: int) -> str:
    return f"llm-ner-{job_id}-{part}"


class JobQueue:
    """The queue a process hands job parts to (and cancels them on)."""

    def __init__(self, settings: Settings, name: str = QUEUE):
        self.settings = settings
        self.connection = redis_connection(settings)
        self.queue = Queue(name, connection=self.connection)

    def check(self) -> None:
        try:
            self.connection.ping()
        except RedisError as error:
            raise BackendError(f"cannot reach Redis at {redis_place(self.settings)} ({type(error).__name__})") from None

    def enqueue_part(self, job_id: str, part: int, tasks: list[dict[str, Any]]) -> None:
        self.queue.enqueue(
            "backend.protocol.rqworker.perform_part", job_id, part, tasks,
            job_id=part_job_id(job_id, part), description=f"job {job_id} part {part} ({len(tasks)} tasks)",
            retry=Retry(max=PART_RETRIES), job_timeout=PART_TIMEOUT, result_ttl=3600, failure_ttl=7 * 86400,
            on_failure=Callback("backend.protocol.rqworker.part_gave_up"),
        )

    def start(self, db: Database, jobs: Jobs, spec: JobSpec, model_version: str, label_config: str, total: int | None) -> str:
        """The job's record, for `plan` to fill; workers read the project's label config from the store."""
        self.check()
        db.save_label_config(str(spec.project_id), label_config)
        return jobs.create(spec, model_version, total, runner="rq")

    def plan(self, jobs: Jobs, job_id: str, spec: JobSpec, client: Any, model_version: str) -> dict[str, Any]:
        """Read the project and hand its tasks in scope to the queue, JOB_PART at a time."""
        return plan_parts(jobs, job_id, spec, client, model_version, self.settings.job_part,
                           lambda part, tasks: self.enqueue_part(job_id, part, tasks))

    def reconcile(self, jobs: Jobs, job_id: str) -> None:
        """A planned job whose unfinished parts the queue no longer holds (Redis restarted without
        persistence, or flushed) would show as running for ever: those parts are lost, and the job
        ends as failed saying so. Nothing is concluded while Redis cannot be reached."""
        record = jobs.record(job_id)
        if record is None or record["state"] != "running" or record.get("runner") != "rq" or not record.get("planned"):
            return
        try:
            lost = [part for part in jobs.unfinished_parts(job_id)
                    if not self.connection.exists(Job.key_for(part_job_id(job_id, part)))]
        except RedisError as error:
            log.warning("job %s: cannot look at its parts in Redis (%s)", job_id, type(error).__name__)
            return
        if lost:
            why = (f"{len(lost)} of its parts vanished from Redis at {redis_place(self.settings)} (Redis lost its data: "
                   "restarted without persistence, or flushed?); their tasks were not pre-labeled: start the job again "
                   "to pre-label what is left")
            log.warning("job %s: %s", job_id, why)
            jobs.lose_parts(job_id, lost, why)

    def cancel(self, jobs: Jobs, job_id: str) -> bool:
        """Ask every worker's parts of the job to stop (they look between writes) and take its queued
        parts off the queue; False when the job is not running."""
        if not jobs.cancel(job_id):
            return False
        for part in jobs.unfinished_parts(job_id):
            try:
                queued = Job.fetch(part_job_id(job_id, part), connection=self.connection)
            except NoSuchJobError:
                continue
            if queued.get_status() in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
                queued.cancel()
                jobs.finish_part(job_id, part, "cancelled")
        jobs.settle(job_id)
        return True
