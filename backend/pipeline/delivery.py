"""Pre-labels delivered to Label Studio outside a /predict answer: work a request's deadline cut
(kept running, see `Backlog`) and project jobs.

Label Studio never asks again for a task holding a prediction of the current model_version, so a
second delivery of the same (task, version) would sit beside the first for good. Whoever delivers a
(project, task, model_version) claims it in the store first: a /predict answer, the late-work
writer or a project job; the others leave it alone, in every worker and process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from backend.infra import metrics
from backend.infra.errors import BadRequest
from backend.infra.storage import Database

log = logging.getLogger(__name__)


class Deliveries:
    def __init__(self, db: Database):
        self.db = db

    def claim(self, project_id: str, model_version: str, task_ids: Iterable[int]) -> set[int]:
        """The ids of these tasks that nobody delivered yet, now claimed by the caller."""
        ids = sorted({int(t) for t in task_ids})
        if not ids:
            return set()
        now = time.time()
        with self.db.transaction() as conn:
            taken = set()
            for start in range(0, len(ids), 500):  # SQLite's limit on variables per statement
                part = ids[start : start + 500]
                marks = ",".join("?" * len(part))
                taken.update(
                    r["task_id"] for r in conn.execute(
                        f"SELECT task_id FROM deliveries WHERE project_id=? AND model_version=? AND task_id IN ({marks})",
                        (project_id, model_version, *part),
                    )
                )
            mine = [i for i in ids if i not in taken]
            conn.executemany(
                "INSERT INTO deliveries(project_id, task_id, model_version, delivered_at) VALUES (?, ?, ?, ?)",
                [(project_id, i, model_version, now) for i in mine],
            )
        return set(mine)

    def release(self, project_id: str, model_version: str, task_ids: Iterable[int]) -> None:
        """A delivery that failed: another may try."""
        with self.db.transaction() as conn:
            conn.executemany(
                "DELETE FROM deliveries WHERE project_id=? AND task_id=? AND model_version=?",
                [(project_id, int(t), model_version) for t in task_ids],
            )


@dataclass
class Delivery:
    project_id: str
    task_id: int
    model_version: str
    result: list[dict[str, Any]]
    score: float | None


def label_studio_client(url: str, api_key: str, timeout: float | None = None) -> Any:
    from backend.learning.labelstudio import sdk_client

    return sdk_client(url, api_key, timeout)


def read_project(client: Any, project_id: int) -> Any:
    """The project as Label Studio has it; a BadRequest naming the project when it cannot be read."""
    try:
        return client.projects.get(id=project_id)
    except Exception as error:  # noqa: BLE001 - the SDK's errors: status and body, never the key
        status = getattr(error, "status_code", None)
        if status == 404:
            raise BadRequest(f"Label Studio has no project {project_id}", status=404) from None
        why = f"HTTP {status}" if status else type(error).__name__
        raise BadRequest(f"cannot read project {project_id} from Label Studio ({why})", status=502) from None


def import_predictions(client: Any, deliveries: Deliveries, items: list[Delivery]) -> int:
    """Write these predictions into Label Studio in one call per project, each (task, version) once.
    Returns how many were written; a failed write releases its claims and raises."""
    written = 0
    by_project: dict[tuple[str, str], list[Delivery]] = {}
    for item in items:
        by_project.setdefault((item.project_id, item.model_version), []).append(item)
    for (project_id, version), group in by_project.items():
        mine = deliveries.claim(project_id, version, [d.task_id for d in group])
        batch = [d for d in group if d.task_id in mine]
        if not batch:
            continue
        request = [
            {"task": d.task_id, "result": d.result, "model_version": version, **({"score": d.score} if d.score is not None else {})}
            for d in batch
        ]
        try:
            client.projects.import_predictions(id=int(project_id), request=request)
        except Exception:
            deliveries.release(project_id, version, mine)
            raise
        written += len(batch)
    return written


class PredictionWriter:
    """Writes finished late pre-labels into Label Studio from a thread of its own, in batches, so a
    click on Retrieve Predictions for thousands of tasks ends with every task pre-labeled."""

    BATCH = 100
    WAIT = 0.5  # seconds a batch waits for more predictions before it is written

    def __init__(self, client: Any, deliveries: Deliveries):
        self.client = client
        self.deliveries = deliveries
        self._queue: queue.Queue[Delivery] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, delivery: Delivery) -> None:
        with self._lock:
            self._idle.clear()
            self._queue.put(delivery)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="prediction-writer", daemon=True)
                self._thread.start()

    def wait_idle(self, timeout: float) -> bool:
        """True once everything submitted has been written or given up on (tests, shutdown)."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=5.0)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            batch = [first]
            deadline = time.monotonic() + self.WAIT
            while len(batch) < self.BATCH and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
            try:
                written = import_predictions(self.client, self.deliveries, batch)
                metrics.DELIVERED.labels("late").inc(written)
                log.info("wrote %d late pre-labels into Label Studio", written)
            except Exception as error:  # noqa: BLE001 - a thread has no caller: the log and the metric say it
                metrics.DELIVERY_FAILURES.inc(len(batch))
                log.warning("could not write %d late pre-labels into Label Studio (%s: %s); Label Studio will ask "
                            "for them again", len(batch), type(error).__name__, str(error)[:300])
            with self._lock:
                if self._queue.empty():
                    self._idle.set()


class Backlog:
    """How many tasks a worker keeps pre-labeling after their /predict's deadline (PREDICT_BACKLOG):
    beyond it, a cut task is dropped and Label Studio asks for it again later."""

    def __init__(self, limit: int):
        self.limit = limit
        self._pending = 0
        self._lock = threading.Lock()

    def admit(self) -> bool:
        with self._lock:
            if self._pending >= self.limit:
                return False
            self._pending += 1
            return True

    def done(self) -> None:
        with self._lock:
            self._pending -= 1

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending
