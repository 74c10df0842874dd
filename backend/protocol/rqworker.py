"""Project jobs on RQ (REDIS_URL): `llm-ner worker`, which runs the parts of jobs that pipeline/jobs/jobqueue.py queues.

RQ is Label Studio's own job library. Each part of a job (pipeline/jobs/parts.py: `plan_parts`,
`PartRun`) is one RQ job, with a deterministic id, a few retries and a failure callback. Workers
run parts in their own process (RQ's SimpleWorker: the Services, model and LLM client stay warm
from one part to the next) and send a heartbeat every WORKER_HEARTBEAT seconds from a thread of
their own while a part runs. A worker killed mid-part stops beating: RQ's StartedJobRegistry
entry of the part expires after 3 heartbeats, and the next maintenance pass of any live worker
(every heartbeat, idle workers wake up for it) puts the part back on the queue (RQ's
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

from redis import Redis
from rq import Queue, SimpleWorker, get_current_job
from rq.exceptions import StopRequested
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty
from rq.worker import WorkerStatus

from backend.infra.errors import BackendError, ConfigError
from backend.infra.settings import Settings, get_settings
from backend.learning.labelstudio import describe_error
from backend.pipeline.jobs.jobqueue import PART_RETRIES, JobQueue, redis_place
from backend.pipeline.jobs.parts import fail_part
from backend.pipeline.jobs.records import JobSpec
from backend.protocol.registry import ModelRegistry, load_model_class
from backend.protocol.services import Services

log = logging.getLogger(__name__)

RETRY_BACKOFF = (2.0, 10.0, 30.0)  # seconds before the 1st, 2nd, 3rd run again of a part that raised
MISSED_BEATS = 3  # heartbeats a running part may miss before it counts as abandoned


# ---- the worker process ----


@dataclass
class WorkerRuntime:
    """What a worker process makes once and every part it runs shares (RQ calls a function by name)."""

    services: Services
    registry: ModelRegistry

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerRuntime:
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


def perform_part(job_id: str, part: int, tasks: list[dict[str, Any]]) -> str:
    """RQ's entry point: run one part of a job with the job's model_version. An exception makes RQ retry it."""
    rt = runtime()
    record = rt.services.jobs.record(job_id)
    if record is None:
        return "no such job"
    label_config = rt.services.db.label_config(record["project_id"])
    if rt.services.label_studio is None or not label_config:
        raise BackendError("this worker cannot run the part: LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY unset, or the project unknown")
    spec = JobSpec(**json.loads(record["spec"]))
    model = rt.registry.get(record["project_id"], label_config)
    try:
        ended = model.prelabel_part(rt.services.label_studio, job_id, part, spec, record["model_version"], tasks).run()
    except Exception as error:
        current = get_current_job()
        left = current.retries_left if current is not None else None
        if left:
            # RQ puts a failed job straight back on the queue: back off first (Label Studio may be
            # restarting), longer at each run; this worker waits, it could not write meanwhile either
            delay = RETRY_BACKOFF[min(PART_RETRIES - left, len(RETRY_BACKOFF) - 1)]
            log.warning("job %s part %d failed (%s); run again in %g s", job_id, part, describe_error(error), delay)
            time.sleep(delay)
        raise
    log.info("job %s part %d (%d tasks): %s", job_id, part, len(tasks), ended or "ended by another run")
    return ended


def part_gave_up(job: Job, connection: Any, kind: Any = None, value: Any = None, traceback: Any = None) -> None:
    """RQ's failure callback: on the last failure of a part (retries spent, or abandoned with none
    left), its tasks are reported with the reason and the part ends, so the job can end."""
    if job.retries_left:
        return  # RQ runs it again
    job_id, part, tasks = job.args
    why = describe_error(value) if isinstance(value, BaseException) else str(getattr(kind, "__name__", kind))
    reason = f"part failed after {PART_RETRIES + 1} runs: {why}"
    rt = runtime()
    fail_part(rt.services.jobs, rt.services.deliveries, job_id, part, [t["id"] for t in tasks], reason)


class PartWorker(SimpleWorker):
    """One slot of a worker process: RQ's SimpleWorker (a part runs in this process: the Services, model
    and LLM client stay warm) in a thread of its own, with a heartbeat thread while a part runs, and a
    part abandoned after MISSED_BEATS heartbeats. The process's main thread (`WorkerProcess`) takes
    the signals and runs RQ's maintenance for all its slots."""

    # RQ's default stops a part that outlives its timeout with SIGALRM, which only the main thread can
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
        # RQ waits on the queue until a part comes (its main thread leaves the wait by a signal): a slot
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
    """`llm-ner worker`: WORKER_PARTS slots (RQ workers in threads) sharing this process's model and LLM
    client, so one part's last calls and its write into Label Studio overlap the next part's calls;
    PREDICT_CONCURRENCY bounds the calls in flight of all of them together. The main thread takes
    SIGINT/SIGTERM (the first: every slot ends its part and stops; the second: stop now, the parts
    left are abandoned and run again elsewhere) and runs RQ's maintenance every heartbeat, which puts
    the parts of dead workers back on the queue."""

    def __init__(self, settings: Settings, queues: list[str], connection: Redis, burst: bool = False):
        self.settings, self.queue_names, self.connection, self.burst = settings, queues, connection, burst
        self.beat = max(1, round(settings.worker_heartbeat))
        self.stopping = threading.Event()
        self.slots: list[PartWorker] = []
        self.level = "DEBUG" if settings.log_level == "DEBUG" else "WARNING"

    def _slot(self, number: int) -> PartWorker:
        queues = [Queue(name, connection=self.connection) for name in self.queue_names]
        return PartWorker(queues, connection=self.connection, heartbeat=self.settings.worker_heartbeat,
                           name=f"{socket.gethostname()}.{os.getpid()}.{number}.{secrets.token_hex(3)}")

    def _signal(self, signum: int, frame: Any) -> None:
        if self.stopping.is_set():
            log.warning("worker: second %s: stopping now; the parts running are run again by another worker",
                        signal.Signals(signum).name)
            os._exit(1)
        log.info("worker: %s: every slot ends its part, then stops (again: stop now)", signal.Signals(signum).name)
        self.stopping.set()
        for slot in self.slots:
            slot._stop_requested = True  # RQ's own flag: the slot's loop ends after its part or its wait

    def _maintain(self) -> None:
        try:
            self.slots[0].clean_registries()  # RQ's: abandoned parts back on the queue, at most one pass per interval
        except Exception as error:
            log.warning("worker: maintenance failed: %s", error)

    def _left_anywhere(self) -> bool:
        """Parts on the queues or running (in any worker, dead ones included until maintenance re-queues them)."""
        for name in self.queue_names:
            queue = Queue(name, connection=self.connection)
            running = StartedJobRegistry(queue=queue).count  # RQ's cleanup first: abandoned parts go back on the queue
            if running or queue.count:
                return True
        return False

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._signal)
        signal.signal(signal.SIGTERM, self._signal)
        while True:
            self.slots = [self._slot(n) for n in range(self.settings.worker_parts)]
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
            # --burst: the queues were empty for every slot; a part still running elsewhere may be a dead
            # worker's, put back on the queue after its missed beats: wait for it rather than leave it
            while not self.stopping.is_set() and self._left_anywhere():
                self._maintain()
                if any(Queue(name, connection=self.connection).count for name in self.queue_names):
                    break
                self.stopping.wait(self.beat)
            else:
                return 0


def run_worker(settings: Settings, queues: list[str], burst: bool = False) -> int:
    """`llm-ner worker`: run job parts from these queues until stopped (or, with burst, until none is left)."""
    global _runtime
    queue = JobQueue(settings)
    queue.check()
    with _runtime_lock:
        _runtime = WorkerRuntime.from_settings(settings)
    if _runtime.services.label_studio is None:
        raise ConfigError("a worker writes predictions into Label Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    log.info("worker: %d slots on queues %s on Redis at %s", settings.worker_parts, ", ".join(queues), redis_place(settings))
    return WorkerProcess(settings, queues, queue.connection, burst).run()
