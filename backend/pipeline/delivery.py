"""Pre-labels delivered to Label Studio outside a /predict answer: work a request's deadline cut
(kept running, see `Backlog`) and project jobs; and what decides whether a task was delivered.

Label Studio holds the truth: a (task, model_version) is delivered when Label Studio holds a
prediction of that version for the task, as read from Label Studio. Label Studio never asks again
for such a task, so a second delivery would sit beside the first for good; a task it no longer
holds (its predictions deleted, an answer its caller gave up on, a write that was dropped) is
delivered again by the next job, /predict or opening, at once.

Claims in the store (`Deliveries`) only keep two writers from racing: whoever delivers a (project,
task, model_version) claims it first: a /predict answer, the late-work writer or a project job. A
claim whose write is under way (unconfirmed, younger than the lease) is left to its holder: the
task is pending. Any other claim (its write ended, or its holder died) stands for nothing: Label
Studio is read, and a task it does not hold is taken over and delivered.

Writes into Label Studio are made once: the SDK's own retries are off for them (it retries a POST
on 5xx, 408, 409, 429 and dropped connections, each retry a second prediction). A write whose
outcome is unknown (a timeout, a 5xx, a dropped connection) is resolved by reading back what Label
Studio holds for its tasks before anything is written again; every write is read back, and only
what Label Studio holds counts as delivered.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from backend.infra import metrics
from backend.infra.errors import BadRequest
from backend.infra.storage import Database
from backend.learning.labelstudio import describe_error
from backend.pipeline.scope import LISTED_FIELDS, field_of, prediction_versions

log = logging.getLogger(__name__)

NO_RETRIES = {"max_retries": 0}  # request_options of every write: a retry the SDK makes is a duplicate
WRITE_TRIES = 3  # writes of one batch when Label Studio's answers are lost (each resolved by reading back first)
READ_PER_CALL = 200  # tasks read back per call (their ids go into the Data Manager query)
# refusals of some tasks of a write (400: Label Studio 1.23 names a task deleted meanwhile; 413: too large),
# not of every write (401, 403, 404: the key, the project): those are split, down to the tasks refused
SPLIT_ON = (400, 413)


@dataclass
class Claims:
    """What `Deliveries.acquire` found for a set of tasks."""

    mine: set[int] = field(default_factory=set)  # claimed by the caller now: theirs to deliver
    present: set[int] = field(default_factory=set)  # Label Studio holds a prediction of the version
    pending: dict[int, str] = field(default_factory=dict)  # being written by another: task -> holder


def holder_name(owner: str | None) -> str:
    """Who holds a claim, for reports: a job, a /predict answer, the late-work writer."""
    owner = owner or ""
    if owner.startswith("job-"):
        return "job " + owner[4:].split("/", 1)[0]
    if owner.startswith("predict-"):
        return "a /predict answer"
    if owner.startswith("late-"):
        return "the late pre-label writer"
    return owner or "an earlier version of the backend"


class Deliveries:
    """Claims on (project, task, model_version), shared by every process through the store.

    A claim taken before a write into Label Studio has an owner and stays unconfirmed until the write
    was read back (`confirm`); a failed write releases it. A process killed between the claim and the
    write leaves an unconfirmed claim: once it is older than the lease (longer than the write's HTTP
    timeout, so its holder can no longer be writing), Label Studio decides (`acquire`)."""

    def __init__(self, db: Database, lease: float = 180.0, clock: Callable[[], float] = time.time):
        self.db = db
        self.lease = lease
        self.clock = clock
        self.owner = f"late-{secrets.token_hex(6)}"  # this process's claims, when the caller names none

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
                    (project_id, task_id, model_version, now, owner or f"predict-{secrets.token_hex(6)}", 0 if owner else 1),
                ).rowcount
                if inserted:
                    mine.add(task_id)
        return mine

    def acquire(self, project_id: str, model_version: str, task_ids: Iterable[int], owner: str | None,
                in_label_studio: Callable[[list[int]], set[int]]) -> Claims:
        """Claim these tasks for a delivery by `owner` (None: a /predict answer, confirmed at once).
        A task nobody claimed is the caller's; a claim under way (unconfirmed, younger than the lease)
        is its holder's (pending); for every other claim, Label Studio is read (`in_label_studio`:
        those of the ids it holds a prediction of this version for): a task it holds is delivered, one
        it does not is taken over by the caller, at once."""
        ids = sorted({int(t) for t in task_ids})
        claims = Claims(mine=self.claim(project_id, model_version, ids, owner))
        rest = [i for i in ids if i not in claims.mine]
        now = self.clock()
        held = self.holders(project_id, model_version, rest) if rest else {}
        ended = {i: h for i, h in held.items() if h[1] or h[2] < now - self.lease}  # written, or its holder died
        claims.pending = {i: holder_name(h[0]) for i, h in held.items() if i not in ended}
        # a task nobody claimed may hold a prediction all the same: Label Studio stored a /predict answer
        # (an annotator opened it while a job ran) after the job listed it; written again, it would be a second
        asked = sorted(claims.mine | set(ended))
        try:
            claims.present = in_label_studio(asked) if asked else set()
        except Exception as error:  # Label Studio cannot tell now: nothing is written twice, it is asked again later
            why = f"unknown: Label Studio could not be read ({describe_error(error)})"
            claims.pending.update(dict.fromkeys(ended, why))
            ended = {}
        if claims.present:
            self.confirm_found(project_id, model_version, claims.present)
            claims.mine -= claims.present
        if not rest:
            return claims
        lost = {i: h for i, h in ended.items() if i not in claims.present}
        gone = [i for i in rest if i not in held]  # released between the claim and the look: claim them now
        claims.mine |= self.claim(project_id, model_version, gone, owner) if gone else set()
        if lost:
            taken = self._take_over(project_id, model_version, lost, owner)
            claims.mine |= taken
            if len(taken) < len(lost):  # another took some over meanwhile: theirs
                again = self.holders(project_id, model_version, [i for i in lost if i not in taken])
                claims.pending.update({i: holder_name(h[0]) for i, h in again.items()})
            log.info("project %s: %d tasks claimed as delivered are not in Label Studio: delivered again", project_id, len(taken))
        for i in gone:
            if i not in claims.mine:
                claims.pending[i] = holder_name(next(iter(self.holders(project_id, model_version, [i]).values()), ("",))[0])
        return claims

    def _take_over(self, project_id: str, model_version: str, stale: dict[int, tuple[str | None, bool, float]],
                   owner: str | None) -> set[int]:
        """Take these claims from their holders, each only if it is still as read (two takers: one wins)."""
        now = self.clock()
        taken = set()
        with self.db.transaction() as conn:
            for task_id, (old_owner, old_confirmed, _) in sorted(stale.items()):
                if conn.execute(
                    "UPDATE deliveries SET owner=?, delivered_at=?, confirmed=? WHERE project_id=? AND model_version=? "
                    "AND task_id=? AND COALESCE(owner, '')=? AND confirmed=?",
                    (owner or f"predict-{secrets.token_hex(6)}", now, 0 if owner else 1, project_id, model_version, task_id,
                     old_owner or "", 1 if old_confirmed else 0),
                ).rowcount:
                    taken.add(task_id)
        return taken

    def confirm(self, project_id: str, model_version: str, task_ids: Iterable[int], owner: str) -> None:
        """The prediction of these claims is in Label Studio (read back)."""
        with self.db.transaction() as conn:
            for task_id in sorted({int(t) for t in task_ids}):
                conn.execute(
                    "UPDATE deliveries SET confirmed=1 WHERE project_id=? AND model_version=? AND task_id=? AND owner=?",
                    (project_id, model_version, task_id, owner),
                )

    def confirm_found(self, project_id: str, model_version: str, task_ids: Iterable[int]) -> None:
        """Label Studio holds these tasks' predictions, whoever wrote them (a holder that died after its write)."""
        with self.db.transaction() as conn:
            for task_id in sorted({int(t) for t in task_ids}):
                conn.execute(
                    "UPDATE deliveries SET confirmed=1 WHERE project_id=? AND model_version=? AND task_id=? AND confirmed=0",
                    (project_id, model_version, task_id),
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


@dataclass
class Written:
    """What became of the tasks handed to `import_predictions`: every one is in exactly one place."""

    delivered: set[int] = field(default_factory=set)  # written by this call and read back from Label Studio
    present: set[int] = field(default_factory=set)  # Label Studio held a prediction of the version already
    pending: dict[int, str] = field(default_factory=dict)  # another writer's right now: task -> who
    failed: dict[int, str] = field(default_factory=dict)  # task -> why it is not in Label Studio

    def add(self, other: Written) -> None:
        self.delivered |= other.delivered
        self.present |= other.present
        self.pending.update(other.pending)
        self.failed.update(other.failed)


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


def predicted_in_label_studio(client: Any, project_id: int | str, task_ids: Iterable[int], model_version: str) -> set[int]:
    """Those of these tasks that hold a prediction of `model_version` in Label Studio, read from the Data
    Manager's task list (a few hundred tasks a call; unlike GET /api/tasks/{id}, it never makes Label
    Studio call /predict)."""
    wanted = sorted({int(t) for t in task_ids})
    found: set[int] = set()
    if not str(project_id).isdigit():
        return found  # not a Label Studio project (a test's or a tool's own name): nothing of it is there
    whole = "," in model_version  # a version with a comma cannot be told apart in the joined list
    for start in range(0, len(wanted), READ_PER_CALL):
        part = wanted[start : start + READ_PER_CALL]
        query = json.dumps({"selectedItems": {"all": False, "included": part}})
        for task in client.tasks.list(project=int(project_id), query=query, fields="all", page_size=READ_PER_CALL,
                                      **({} if whole else {"include": LISTED_FIELDS})):
            task_id = int(field_of(task, "id"))
            if task_id in part and model_version in prediction_versions(task):
                found.add(task_id)
    return found


def _ambiguous(error: Exception) -> bool:
    """Whether a failed write may have been stored: no answer (a timeout, a dropped connection), or a
    5xx / 408 (a gateway may time out after Label Studio stored it). Another answer is a refusal:
    Label Studio validates the whole import before storing any of it."""
    status = getattr(error, "status_code", None)
    return status is None or status >= 500 or status == 408


def import_predictions(client: Any, deliveries: Deliveries, items: list[Delivery], owner: str | None = None) -> Written:
    """Write these predictions into Label Studio in one call per project, each (task, version) once.
    Claims are `owner`'s (this process's by default). A task Label Studio holds already is not
    written; one another writer is writing is left to it. Every write is read back: what Label
    Studio holds is delivered (its claims confirmed); a write whose answer was lost is resolved by
    that read before the rest is written again. Label Studio validates a call whole and refuses it
    whole (one task of it deleted meanwhile): a call refused for some of its tasks (SPLIT_ON) is
    split in halves, down to single tasks, so every task it accepts is written and only the refused
    ones fail, with its reason. A refusal of any write (its key, its project) releases the claims
    and raises."""
    owner = owner or deliveries.owner
    outcome = Written()
    by_project: dict[tuple[str, str], list[Delivery]] = {}
    for item in items:
        by_project.setdefault((item.project_id, item.model_version), []).append(item)
    for (project_id, version), group in by_project.items():
        def holds(ids: list[int], project_id: str = project_id, version: str = version) -> set[int]:
            return predicted_in_label_studio(client, project_id, ids, version)

        claims = deliveries.acquire(project_id, version, [d.task_id for d in group], owner, holds)
        outcome.present |= claims.present
        outcome.pending.update(claims.pending)
        batch = _Batch(client, deliveries, project_id, version, owner, holds, outcome)
        batch.write({d.task_id: d for d in group if d.task_id in claims.mine})
    return outcome


@dataclass
class _Batch:
    """The writes of one project's predictions of one version (`import_predictions`)."""

    client: Any
    deliveries: Deliveries
    project_id: str
    version: str
    owner: str
    holds: Callable[[list[int]], set[int]]
    outcome: Written

    def write(self, left: dict[int, Delivery]) -> None:
        project_id, version, owner = self.project_id, self.version, self.owner
        why = ""
        for _ in range(WRITE_TRIES):
            if not left:
                break
            request = [
                {"task": d.task_id, "result": d.result, "model_version": version, **({"score": d.score} if d.score is not None else {})}
                for d in left.values()
            ]
            try:
                self.client.projects.import_predictions(id=int(project_id), request=request, request_options=NO_RETRIES)
                why = "written, but not found in Label Studio when read back"
            except Exception as error:
                if not _ambiguous(error):  # refused, nothing of it stored
                    if getattr(error, "status_code", None) not in SPLIT_ON:
                        self.deliveries.release(project_id, version, left, owner)
                        raise
                    self._refused(left, error)
                    return
                why = f"writing to Label Studio: {describe_error(error)}"
                log.warning("project %s: a write of %d predictions ended without an answer (%s): reading back what "
                            "Label Studio holds", project_id, len(left), describe_error(error))
            try:
                found = self.holds(sorted(left))
            except Exception as error:
                # neither written for sure nor read back: the claims stay, unconfirmed, for the lease
                log.warning("project %s: could not read back %d predictions (%s)", project_id, len(left), describe_error(error))
                raise
            self.deliveries.confirm(project_id, version, found, owner)
            self.outcome.delivered |= found
            left = {i: d for i, d in left.items() if i not in found}
        if left:
            self.deliveries.release(project_id, version, left, owner)
            self.outcome.failed.update(dict.fromkeys(left, why))

    def _refused(self, left: dict[int, Delivery], error: Exception) -> None:
        """Label Studio refused this write: each half is written on its own, a single task fails."""
        if len(left) > 1:
            ids = list(left)
            for half in (ids[: len(ids) // 2], ids[len(ids) // 2 :]):
                self.write({i: left[i] for i in half})
            return
        why = f"refused by Label Studio: {describe_error(error)}"
        log.warning("project %s: task %s: %s", self.project_id, next(iter(left)), why)
        self.deliveries.release(self.project_id, self.version, left, self.owner)
        self.outcome.failed.update(dict.fromkeys(left, why))


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
                metrics.DELIVERED.labels("late").inc(len(written.delivered))
                metrics.DELIVERY_FAILURES.inc(len(written.failed))
                log.info("wrote %d late pre-labels into Label Studio (%d held already, %d being written by another, "
                         "%d failed)", len(written.delivered), len(written.present), len(written.pending), len(written.failed))
            except Exception as error:
                metrics.DELIVERY_FAILURES.inc(len(batch))
                log.warning("could not write %d late pre-labels into Label Studio (%s); Label Studio will ask "
                            "for them again", len(batch), describe_error(error))


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
