"""Project jobs on RQ (REDIS_URL): the queue a job's chunks go to, and `llm-ner worker`, which runs them.

RQ is Label Studio's own job library. Each chunk of a job (pipeline/jobs.py: `plan_chunks`,
`ChunkRun`) is one RQ job, with a deterministic id, a few retries and a failure callback. Workers
run chunks in their own process (RQ's SimpleWorker: the Services, model and LLM client stay warm
from one chunk to the next) and send a heartbeat every WORKER_HEARTBEAT seconds from a thread of
their own while a chunk runs. A worker killed mid-chunk stops beating: RQ's StartedJobRegistry
entry of the chunk expires after 3 heartbeats, and the next maintenance pass of any live worker
(every heartbeat, idle workers wake up for it) puts the chunk back on the queue (RQ's
`StartedJobRegistry.cleanup` retries an abandoned job that has retries left).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis import Redis
from redis.exceptions import RedisError
from rq import Callback, Queue, Retry, SimpleWorker, get_current_job
from rq.exceptions import NoSuchJobError, StopRequested
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty
from rq.worker import WorkerStatus

from backend.infra.errors import BackendError, ConfigError
from backend.infra.settings import Settings, get_settings
from backend.pipeline.jobs import Jobs, JobSpec, fail_chunk, plan_chunks
from backend.protocol.registry import ModelRegistry
from backend.protocol.services import Services

log = logging.getLogger(__name__)

QUEUE = "llm-ner"
CHUNK_RETRIES = 3  # runs of a chunk after its first (a dead worker, Label Studio down...)
RETRY_BACKOFF = (2.0, 10.0, 30.0)  # seconds before the 1st, 2nd, 3rd run again of a chunk that raised
CHUNK_TIMEOUT = 3600  # seconds: RQ stops a chunk that runs longer (its tasks' LLM calls have their own timeouts)
MISSED_BEATS = 3  # heartbeats a running chunk may miss before it counts as abandoned


def redis_connection(settings: Settings) -> Redis:
    if settings.redis_url is None:
        raise ConfigError("set REDIS_URL to run project jobs on RQ")
    # redis-py 8 gives up reading a socket after 5 s by default, and a worker waits on the queue (BLMOVE)
    # up to a heartbeat: a connection made with that default (the first ping's, say) and later lent to
    # a wait failed it over and over, the worker backing off up to a minute with chunks on the queue
    return Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=settings.worker_heartbeat + 15,
                          socket_connect_timeout=10)


def redis_place(settings: Settings) -> str:
    """Where Redis is, for messages: host and port, never the password in the URL."""
    url = urlsplit(settings.redis_url.get_secret_value()) if settings.redis_url else None
    return f"{url.hostname}:{url.port or 6379}" if url and url.hostname else "the REDIS_URL socket"


def chunk_job_id(job_id: str, chunk: int) -> str:
    return f"llm-ner-{job_id}-{chunk}"


class JobQueue:
    """The queue a process hands job chunks to (and cancels them on)."""

    def __init__(self, settings: Settings, name: str = QUEUE):
        self.settings = settings
        self.connection = redis_connection(settings)
        self.queue = Queue(name, connection=self.connection)

    def check(self) -> None:
        try:
            self.connection.ping()
        except RedisError as error:
            raise BackendError(f"cannot reach Redis at {redis_place(self.settings)} ({type(error).__name__})") from None

    def enqueue_chunk(self, job_id: str, chunk: int, tasks: list[dict[str, Any]]) -> None:
        self.queue.enqueue(
            "backend.protocol.rqworker.perform_chunk", job_id, chunk, tasks,
            job_id=chunk_job_id(job_id, chunk), description=f"job {job_id} chunk {chunk} ({len(tasks)} tasks)",
            retry=Retry(max=CHUNK_RETRIES), job_timeout=CHUNK_TIMEOUT, result_ttl=3600, failure_ttl=7 * 86400,
            on_failure=Callback("backend.protocol.rqworker.chunk_gave_up"),
        )

    def start(self, services: Services, spec: JobSpec, model_version: str, label_config: str, total: int | None) -> str:
        """The job's record, for `plan` to fill; workers read the project's label config from the store."""
        self.check()
        services.db.save_label_config(str(spec.project_id), label_config)
        return services.jobs.create(spec, model_version, total, runner="rq")

    def plan(self, jobs: Jobs, job_id: str, spec: JobSpec, client: Any, model_version: str) -> dict[str, Any]:
        """Read the project and hand its tasks in scope to the queue, JOB_CHUNK at a time."""
        return plan_chunks(jobs, job_id, spec, client, model_version, self.settings.job_chunk,
                           lambda chunk, tasks: self.enqueue_chunk(job_id, chunk, tasks))

    def reconcile(self, jobs: Jobs, job_id: str) -> None:
        """A planned job whose unfinished chunks the queue no longer holds (Redis restarted without
        persistence, or flushed) would show as running for ever: those chunks are lost, and the job
        ends as failed saying so. Nothing is concluded while Redis cannot be reached."""
        record = jobs.record(job_id)
        if record is None or record["state"] != "running" or record.get("runner") != "rq" or not record.get("planned"):
            return
        try:
            lost = [chunk for chunk in jobs.unfinished_chunks(job_id)
                    if not self.connection.exists(Job.key_for(chunk_job_id(job_id, chunk)))]
        except RedisError as error:
            log.warning("job %s: cannot look at its chunks in Redis (%s)", job_id, type(error).__name__)
            return
        if lost:
            why = (f"{len(lost)} of its chunks vanished from Redis at {redis_place(self.settings)} (Redis lost its data: "
                   "restarted without persistence, or flushed?); their tasks were not pre-labeled: start the job again "
                   "to pre-label what is left")
            log.warning("job %s: %s", job_id, why)
            jobs.lose_chunks(job_id, lost, why)

    def cancel(self, jobs: Jobs, job_id: str) -> bool:
        """Ask every worker's chunks of the job to stop (they look between writes) and take its queued
        chunks off the queue; False when the job is not running."""
        if not jobs.cancel(job_id):
            return False
        for chunk in jobs.unfinished_chunks(job_id):
            try:
                queued = Job.fetch(chunk_job_id(job_id, chunk), connection=self.connection)
            except NoSuchJobError:
                continue
            if queued.get_status() in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
                queued.cancel()
                jobs.finish_chunk(job_id, chunk, "cancelled")
        jobs.settle(job_id)
        return True


# ---- the worker process ----


@dataclass
class WorkerRuntime:
    """What a worker process makes once and every chunk it runs shares (RQ calls a function by name)."""

    services: Services
    registry: ModelRegistry

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerRuntime:
        from backend.protocol.server import load_model_class

        services = Services.from_settings(settings)
        return cls(services, ModelRegistry(load_model_class(), services))


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def runtime() -> WorkerRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WorkerRuntime.from_settings(get_settings())
        return _runtime


def perform_chunk(job_id: str, chunk: int, tasks: list[dict[str, Any]]) -> str:
    """RQ's entry point: run one chunk of a job with the job's model_version. An exception makes RQ retry it."""
    rt = runtime()
    record = rt.services.jobs.record(job_id)
    if record is None:
        return "no such job"
    label_config = rt.services.db.label_config(record["project_id"])
    if rt.services.label_studio is None or not label_config:
        raise BackendError("this worker cannot run the chunk: LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY unset, or the project unknown")
    spec = JobSpec(**json.loads(record["spec"]))
    model = rt.registry.get(record["project_id"], label_config)
    try:
        ended = model.prelabel_chunk(rt.services.label_studio, job_id, chunk, spec, record["model_version"], tasks).run()
    except Exception as error:
        current = get_current_job()
        left = current.retries_left if current is not None else None
        if left:
            # RQ puts a failed job straight back on the queue: back off first (Label Studio may be
            # restarting), longer at each run; this worker waits, it could not write meanwhile either
            delay = RETRY_BACKOFF[min(CHUNK_RETRIES - left, len(RETRY_BACKOFF) - 1)]
            log.warning("job %s chunk %d failed (%s: %s); run again in %g s", job_id, chunk, type(error).__name__,
                        str(error)[:200], delay)
            time.sleep(delay)
        raise
    log.info("job %s chunk %d (%d tasks): %s", job_id, chunk, len(tasks), ended or "ended by another run")
    return ended


def chunk_gave_up(job: Job, connection: Any, kind: Any = None, value: Any = None, traceback: Any = None) -> None:
    """RQ's failure callback: on the last failure of a chunk (retries spent, or abandoned with none
    left), its tasks are reported with the reason and the chunk ends, so the job can end."""
    if job.retries_left:
        return  # RQ runs it again
    job_id, chunk, tasks = job.args
    reason = f"chunk failed after {CHUNK_RETRIES + 1} runs: {getattr(kind, '__name__', kind)}: {str(value)[:200]}"
    rt = runtime()
    fail_chunk(rt.services.jobs, rt.services.deliveries, job_id, chunk, [t["id"] for t in tasks], reason)


class ChunkWorker(SimpleWorker):
    """One slot of a worker process: RQ's SimpleWorker (a chunk runs in this process: the Services, model
    and LLM client stay warm) in a thread of its own, with a heartbeat thread while a chunk runs, and a
    chunk abandoned after MISSED_BEATS heartbeats. The process's main thread (`WorkerProcess`) takes
    the signals and runs RQ's maintenance for all its slots."""

    # RQ's default stops a chunk that outlives its timeout with SIGALRM, which only the main thread can
    # take: a slot is a thread, so a timer raises in it instead
    death_penalty_class = TimerDeathPenalty

    def __init__(self, *args: Any, heartbeat: float, **kwargs: Any):
        beat = max(1, round(heartbeat))
        super().__init__(*args, job_monitoring_interval=beat, maintenance_interval=beat, **kwargs)

    @property
    def dequeue_timeout(self) -> int:
        # RQ blocks on the queue for worker_ttl - 15 s (405 s by default): look for a stop request every beat
        return max(1, int(self.maintenance_interval))

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> tuple[Job, Queue] | None:
        # RQ waits on the queue until a chunk comes (its main thread leaves the wait by a signal): a slot
        # comes out every beat to see whether the process is stopping
        while True:
            if self._stop_requested:
                raise StopRequested()
            found = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time=timeout)
            if found is not None or timeout is None:
                return found

    @property
    def should_run_maintenance_tasks(self) -> bool:
        return False  # the process's main thread does, every heartbeat, busy slots or not

    def _install_signal_handlers(self) -> None:
        pass  # only the main thread may; it stops the slots

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return MISSED_BEATS * int(self.job_monitoring_interval)

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.job_monitoring_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception as error:
                    log.warning("worker %s: heartbeat failed: %s", self.name, error)

        thread = threading.Thread(target=beat, name="rq-heartbeat", daemon=True)
        thread.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            thread.join()
        self.set_state(WorkerStatus.IDLE)


class WorkerProcess:
    """`llm-ner worker`: WORKER_CHUNKS slots (RQ workers in threads) sharing this process's model and LLM
    client, so one chunk's last calls and its write into Label Studio overlap the next chunk's calls;
    PREDICT_CONCURRENCY bounds the calls in flight of all of them together. The main thread takes
    SIGINT/SIGTERM (the first: every slot ends its chunk and stops; the second: stop now, the chunks
    left are abandoned and run again elsewhere) and runs RQ's maintenance every heartbeat, which puts
    the chunks of dead workers back on the queue."""

    def __init__(self, settings: Settings, queues: list[str], connection: Redis, burst: bool = False):
        self.settings, self.queue_names, self.connection, self.burst = settings, queues, connection, burst
        self.beat = max(1, round(settings.worker_heartbeat))
        self.stopping = threading.Event()
        self.slots: list[ChunkWorker] = []
        self.level = "DEBUG" if settings.log_level == "DEBUG" else "WARNING"

    def _slot(self, number: int) -> ChunkWorker:
        queues = [Queue(name, connection=self.connection) for name in self.queue_names]
        return ChunkWorker(queues, connection=self.connection, heartbeat=self.settings.worker_heartbeat,
                           name=f"{socket.gethostname()}.{os.getpid()}.{number}.{secrets.token_hex(3)}")

    def _signal(self, signum: int, frame: Any) -> None:
        if self.stopping.is_set():
            log.warning("worker: second %s: stopping now; the chunks running are run again by another worker",
                        signal.Signals(signum).name)
            os._exit(1)
        log.info("worker: %s: every slot ends its chunk, then stops (again: stop now)", signal.Signals(signum).name)
        self.stopping.set()
        for slot in self.slots:
            slot._stop_requested = True  # RQ's own flag: the slot's loop ends after its chunk or its wait

    def _maintain(self) -> None:
        try:
            self.slots[0].clean_registries()  # RQ's: abandoned chunks back on the queue, at most one pass per interval
        except Exception as error:
            log.warning("worker: maintenance failed: %s", error)

    def _left_anywhere(self) -> bool:
        """Chunks on the queues or running (in any worker, dead ones included until maintenance re-queues them)."""
        for name in self.queue_names:
            queue = Queue(name, connection=self.connection)
            running = StartedJobRegistry(queue=queue).count  # RQ's cleanup first: abandoned chunks go back on the queue
            if running or queue.count:
                return True
        return False

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._signal)
        signal.signal(signal.SIGTERM, self._signal)
        while True:
            self.slots = [self._slot(n) for n in range(self.settings.worker_chunks)]
            threads = [threading.Thread(target=slot.work, kwargs={"burst": self.burst, "logging_level": self.level},
                                        name=f"rq-slot-{n}") for n, slot in enumerate(self.slots)]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                self._maintain()
                for thread in threads:
                    thread.join(timeout=self.beat / len(threads))
            if self.stopping.is_set():
                return 0
            if not self.burst:
                # RQ ends a worker's loop by itself only on an error it cannot handle (logged above): a
                # process left with no slot exits non-zero, for its supervisor (compose, systemd) to restart it
                log.error("worker: every slot stopped on its own (see above); exiting")
                return 1
            # --burst: the queues were empty for every slot; a chunk still running elsewhere may be a dead
            # worker's, put back on the queue after its missed beats: wait for it rather than leave it
            while not self.stopping.is_set() and self._left_anywhere():
                self._maintain()
                if any(Queue(name, connection=self.connection).count for name in self.queue_names):
                    break
                self.stopping.wait(self.beat)
            else:
                return 0


def run_worker(settings: Settings, queues: list[str], burst: bool = False) -> int:
    """`llm-ner worker`: run job chunks from these queues until stopped (or, with burst, until none is left)."""
    global _runtime
    queue = JobQueue(settings)
    queue.check()
    with _runtime_lock:
        _runtime = WorkerRuntime.from_settings(settings)
    if _runtime.services.label_studio is None:
        raise ConfigError("a worker writes predictions into Label Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    log.info("worker: %d slots on queues %s on Redis at %s", settings.worker_chunks, ", ".join(queues), redis_place(settings))
    return WorkerProcess(settings, queues, queue.connection, burst).run()
