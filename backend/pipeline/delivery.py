"""Pre-labels delivered to Label Studio outside a /predict answer: work a request's deadline cut
(kept running, see `Backlog`) and project jobs.

Label Studio never asks again for a task holding a prediction of the current model_version, so a
second delivery of the same (task, version) would sit beside the first for good. Whoever delivers a
(project, task, model_version) claims it in the store first: a /predict answer, the late-work
writer or a project job; the others leave it alone, in every worker and process. A claim before a
write is confirmed after it, so one left by a process killed in between can be taken over (`Deliveries`).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from backend.infra import metrics
from backend.infra.errors import BadRequest
from backend.infra.storage import Database

log = logging.getLogger(__name__)


class Deliveries:
    """Claims on (project, task, model_version), shared by every process through the store.

    A claim taken before a write into Label Studio has an owner and stays unconfirmed until the write
    succeeded (`confirm`); a failed write releases it. A process killed between the claim and the
    write leaves an unconfirmed claim: once it is older than the lease (longer than the write's HTTP
    timeout, so its holder can no longer be writing), whoever finds the task still without a
    prediction of that version in Label Studio takes it over (`import_predictions`)."""

    def __init__(self, db: Database, lease: float = 180.0, clock: Callable[[], float] = time.time):
        self.db = db
        self.lease = lease
        self.clock = clock
        self.owner = f"process-{secrets.token_hex(6)}"  # this process's claims, when the caller names none

    def claim(self, project_id: str, model_version: str, task_ids: Iterable[int], owner: str | None = None) -> set[int]:
        """The ids of these tasks that nobody claimed yet, now claimed by the caller. With an `owner`, the
        claims wait for `confirm` (a write into Label Studio follows); without, they are confirmed at once
        (a /predict answer: Label Studio stores it itself)."""
        ids = sorted({int(t) for t in task_ids})
        if not ids:
            return set()
        now = self.clock()
        mine = set()
        with self.db.transaction() as conn:
            for task_id in ids:  # one statement per task: its rowcount says whether the claim is ours
                inserted = conn.execute(
                    "INSERT INTO deliveries(project_id, task_id, model_version, delivered_at, owner, confirmed) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (project_id, model_version, task_id) DO NOTHING",
                    (project_id, task_id, model_version, now, owner, 0 if owner else 1),
                ).rowcount
                if inserted:
                    mine.add(task_id)
        return mine

    def take_over(self, project_id: str, model_version: str, task_ids: Iterable[int], owner: str) -> set[int]:
        """Of these tasks, those whose claim is unconfirmed and older than the lease, now `owner`'s."""
        now = self.clock()
        taken = set()
        with self.db.transaction() as conn:
            for task_id in sorted({int(t) for t in task_ids}):
                if conn.execute(
                    "UPDATE deliveries SET owner=?, delivered_at=? WHERE project_id=? AND model_version=? AND task_id=? "
                    "AND confirmed=0 AND delivered_at < ?",
                    (owner, now, project_id, model_version, task_id, now - self.lease),
                ).rowcount:
                    taken.add(task_id)
        return taken

    def confirm(self, project_id: str, model_version: str, task_ids: Iterable[int], owner: str) -> None:
        """The prediction of these claims is in Label Studio."""
        with self.db.transaction() as conn:
            for task_id in sorted({int(t) for t in task_ids}):
                conn.execute(
                    "UPDATE deliveries SET confirmed=1 WHERE project_id=? AND model_version=? AND task_id=? AND owner=?",
                    (project_id, model_version, task_id, owner),
                )

    def release(self, project_id: str, model_version: str, task_ids: Iterable[int], owner: str | None = None) -> None:
        """A delivery that failed: another may try (only unconfirmed claims, `owner`'s when given)."""
        with self.db.transaction() as conn:
            for task_id in sorted({int(t) for t in task_ids}):
                conn.execute(
                    "DELETE FROM deliveries WHERE project_id=? AND task_id=? AND model_version=? AND confirmed=0"
                    + (" AND owner=?" if owner else ""),
                    (project_id, task_id, model_version, *((owner,) if owner else ())),
                )

    def holders(self, project_id: str, model_version: str, task_ids: Iterable[int]) -> dict[int, tuple[str | None, bool, float]]:
        """task id -> (owner, confirmed, claimed at) for the claimed ones among these tasks."""
        ids = sorted({int(t) for t in task_ids})
        found: dict[int, tuple[str | None, bool, float]] = {}
        for start in range(0, len(ids), 500):  # SQLite's limit on variables per statement
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            for row in self.db.query(
                "SELECT task_id, owner, confirmed, delivered_at FROM deliveries "
                f"WHERE project_id=? AND model_version=? AND task_id IN ({marks})",
                (project_id, model_version, *part),
            ):
                found[int(row["task_id"])] = (row["owner"], bool(row["confirmed"]), float(row["delivered_at"]))
        return found


@dataclass
class Delivery:
    project_id: str
    task_id: int
    model_version: str
    result: list[dict[str, Any]]
    score: float | None


def label_studio_client(url: str, api_key: str, timeout: float | None = None) -> Any:
    """The SDK's client; `timeout` (seconds per request) keeps every write shorter than a claim's lease."""
    from backend.learning.labelstudio import sdk_client

    return sdk_client(url, api_key, timeout)


def read_project(client: Any, project_id: int) -> Any:
    """The project as Label Studio has it; a BadRequest naming the project when it cannot be read."""
    try:
        return client.projects.get(id=project_id)
    except Exception as error:
        status = getattr(error, "status_code", None)
        if status == 404:
            raise BadRequest(f"Label Studio has no project {project_id}", status=404) from None
        why = f"HTTP {status}" if status else type(error).__name__
        raise BadRequest(f"cannot read project {project_id} from Label Studio ({why})", status=502) from None


def predicted_in_label_studio(client: Any, task_ids: Iterable[int], model_version: str) -> set[int]:
    """Those of these tasks that hold a prediction of `model_version` in Label Studio (one call per task:
    only for claims taken over, which are rare)."""
    return {
        task_id for task_id in task_ids
        if any(getattr(p, "model_version", None) == model_version for p in client.predictions.list(task=task_id))
    }


def import_predictions(client: Any, deliveries: Deliveries, items: list[Delivery], owner: str | None = None) -> int:
    """Write these predictions into Label Studio in one call per project, each (task, version) once.
    Claims are `owner`'s (this process's by default), confirmed after the write; a claim left
    unconfirmed past the lease by a holder that died is taken over, and the task written unless Label
    Studio holds its prediction already (then the claim is only confirmed). Returns how many were
    written; a write Label Studio refused releases its claims and raises."""
    owner = owner or deliveries.owner
    written = 0
    by_project: dict[tuple[str, str], list[Delivery]] = {}
    for item in items:
        by_project.setdefault((item.project_id, item.model_version), []).append(item)
    for (project_id, version), group in by_project.items():
        ids = [d.task_id for d in group]
        mine = deliveries.claim(project_id, version, ids, owner)
        others = [i for i in ids if i not in mine]
        if others:
            stale = deliveries.take_over(project_id, version, others, owner)
            if stale:
                present = predicted_in_label_studio(client, stale, version)
                deliveries.confirm(project_id, version, present, owner)
                mine |= stale - present
                log.info("took over %d stale claims of project %s (%d already in Label Studio)", len(stale), project_id, len(present))
        batch = [d for d in group if d.task_id in mine]
        if not batch:
            continue
        request = [
            {"task": d.task_id, "result": d.result, "model_version": version, **({"score": d.score} if d.score is not None else {})}
            for d in batch
        ]
        try:
            client.projects.import_predictions(id=int(project_id), request=request)
        except Exception as error:
            # Label Studio answered an error: nothing was stored, another may try at once. No answer (a
            # timeout, a dropped connection) may still have stored it: the claims wait for the lease,
            # after which a taker looks in Label Studio first.
            if getattr(error, "status_code", None) is not None:
                deliveries.release(project_id, version, mine, owner)
            raise
        deliveries.confirm(project_id, version, mine, owner)
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
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, delivery: Delivery) -> None:
        with self._lock:
            self._queue.put(delivery)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="prediction-writer", daemon=True)
                self._thread.start()

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
            except Exception as error:
                metrics.DELIVERY_FAILURES.inc(len(batch))
                log.warning("could not write %d late pre-labels into Label Studio (%s: %s); Label Studio will ask "
                            "for them again", len(batch), type(error).__name__, str(error)[:300])


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
