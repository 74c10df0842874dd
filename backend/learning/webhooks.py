"""Label Studio's webhook events, turned into example-store operations (see PROTOCOL.md for payloads).

ANNOTATION_CREATED / ANNOTATION_UPDATED store the annotation's spans as the task's example; skipped or
cancelled annotations are not examples; ANNOTATIONS_DELETED removes what those annotations made;
START_TRAINING rebuilds the project's examples from Label Studio through the SDK; TASKS_CREATED hands
the new tasks to the warm start. Single-annotation events are one SQLite transaction, committed
before the answer (so an acknowledged correction survives a kill -9); the rebuild runs in a
background thread after the answer, since Label Studio waits only 1 s for a webhook.

How much a webhook is trusted depends on the mode (`Trust`, chosen by the settings):
- verified (LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set): an annotation event is only a
  notification: the annotation and its task are read from Label Studio by id, and a deletion is
  applied only when Label Studio no longer has the annotation;
- authenticated (BASIC_AUTH_USER/PASS set): /webhook needs the credentials, as every route does;
- open (neither): the payload is used, within bounds: ids and times in sane ranges, texts up to
  MAX_TEXT_CHARS, a bounded number of regions and ids, deletions only of annotations the store
  holds, no warm start.
In every mode each field is validated, each span checked against the text, and payloads (which
carry the project's token) are never logged whole.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import Counter as PromCounter
from pydantic import Field, StrictBool, field_validator

from backend.infra.errors import BadRequest, ConfigError
from backend.infra.guards import OnePerKey
from backend.infra.payloads import MAX_ID, Id, Lenient, validated
from backend.infra.settings import Settings
from backend.learning.labelstudio import LabelStudioSource, describe_error
from backend.learning.store import ExampleStore, timestamp
from backend.ner.labelconfig import NerSchema, NerTarget
from backend.spans.alignment import Span

log = logging.getLogger(__name__)

SPANS = PromCounter("llm_ner_example_spans_total", "Spans of human annotations, by outcome", ["outcome"])

# Bounds on what one webhook may carry (a genuine one is far below each)
MAX_RESULTS = 5_000  # regions of one annotation
MAX_DELETED_IDS = 100_000  # annotation ids of one ANNOTATIONS_DELETED
MAX_NEW_TASKS = 1_000  # tasks of one TASKS_CREATED handed to the warm start
EARLIEST = 946_684_800.0  # 2000-01-01T00:00:00Z: no annotation is older
FUTURE_SLACK = 86_400.0  # clocks disagree, but not by more than a day
# Checking spans: where an offset is wrong, the surface is looked for near it first; searches of the
# whole text are limited per annotation, so that a text of 200,000 characters with thousands of
# wrong regions costs milliseconds, not minutes
NEAR = 2_000
WHOLE_TEXT_SEARCHES = 50


def plausible_time(value: object, now: float | None = None) -> float:
    """An annotation's `updated_at` (ISO 8601 from Label Studio, or epoch seconds) as epoch seconds;
    now if absent. Not a time (NaN, 1e300, a far future that would pin a forged example against
    genuine updates, a date before 2000): ValueError."""
    now = time.time() if now is None else now
    if value is None or (isinstance(value, str) and not value.strip()):
        return now
    if isinstance(value, bool):
        raise ValueError("must be an ISO 8601 time or epoch seconds")
    if isinstance(value, (int, float)):
        moment = float(value)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError):
            raise ValueError("must be an ISO 8601 time or epoch seconds") from None
    else:
        raise ValueError("must be an ISO 8601 time or epoch seconds")
    if not math.isfinite(moment) or moment < EARLIEST or moment > now + FUTURE_SLACK:
        raise ValueError("is not a plausible time (before 2000, or more than a day ahead)")
    return moment


class EventAnnotation(Lenient):
    id: Id
    task: Id | dict[str, Any] | None = None
    result: list[dict[str, Any]] = Field(default_factory=list)
    was_cancelled: StrictBool = False
    updated_at: float = Field(default=None, validate_default=True)  # type: ignore[assignment]

    @field_validator("updated_at", mode="before")
    @classmethod
    def _time(cls, value: object) -> float:
        return plausible_time(value)


class EventTask(Lenient):
    id: Id
    data: dict[str, Any]


class Ref(Lenient):
    """Something named by its id only (an annotation deleted, the task of an annotation, a new task)."""

    id: Id


# ---- how far webhooks are trusted ----
@dataclass(frozen=True)
class Trust:
    authenticated: bool  # /webhook needs the basic-auth credentials (BASIC_AUTH_USER/PASS)
    verified: bool  # events are checked against Label Studio (LABEL_STUDIO_URL/API_KEY)

    @classmethod
    def from_settings(cls, settings: Settings) -> Trust:
        return cls(
            authenticated=bool(settings.basic_auth_user),
            verified=bool(settings.label_studio_url and settings.label_studio_api_key),
        )

    @property
    def name(self) -> str:
        return {(True, True): "authenticated and verified", (True, False): "authenticated",
                (False, True): "verified", (False, False): "open"}[(self.authenticated, self.verified)]

    def describe(self) -> str:
        parts = []
        if self.authenticated:
            parts.append("/webhook requires the basic-auth credentials like every route")
            if self.verified:
                parts.append("the backend adds them to each project's Label Studio webhook after /setup")
            else:
                parts.append("run `llm-ner connect --project ID` so that Label Studio sends them")
        else:
            parts.append("/webhook accepts any caller that reaches the port (BASIC_AUTH_USER/PASS unset)")
        if self.verified:
            parts.append("annotations are read from Label Studio by id, never taken from the payload")
        else:
            parts.append(
                "annotations are taken from the payload within bounds (LABEL_STUDIO_URL/API_KEY unset)"
                + ("" if self.authenticated else "; deletions only of known annotations; no warm start")
            )
        return f"webhook trust: {self.name}: " + "; ".join(parts)


@dataclass
class Learned:
    """What one webhook did: its outcome (for the answer, logs and tests), and what the model acts on."""

    outcome: str
    # the stored annotation's regions and id (the project's guidelines are read from them)
    result: list[dict[str, Any]] | None = None
    annotation_id: int | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)  # TASKS_CREATED, when they can be trusted


# ---- checking human spans against the text ----
@dataclass
class Checked:
    spans: list[Span] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # ok / repaired / dropped_<reason>


class _Text:
    """One text, for checking many spans against it: the UTF-16 offset table and surface searches are
    built once per text, not once per span (which was O(text length x spans))."""

    def __init__(self, text: str):
        self.text = text
        self._utf16: list[int] | None = None  # code units before each index; None: no character beyond the BMP
        self._astral = not text.isascii() and any(ord(c) > 0xFFFF for c in text)
        self._patterns: dict[str, re.Pattern | None] = {}
        self._everywhere: dict[str, list[tuple[int, int]]] = {}
        self.searches_left = WHOLE_TEXT_SEARCHES

    def from_utf16(self, units: int) -> int | None:
        """The code-point index at `units` UTF-16 code units (a browser's offsets, when emoji precede)."""
        if not self._astral:
            return units if 0 <= units <= len(self.text) else None
        if self._utf16 is None:
            self._utf16 = list(itertools.accumulate((2 if ord(c) > 0xFFFF else 1 for c in self.text), initial=0))
        index = bisect.bisect_left(self._utf16, units)
        return index if index < len(self._utf16) and self._utf16[index] == units else None

    def _pattern(self, surface: str) -> re.Pattern | None:
        if surface not in self._patterns:
            words = surface.split()
            self._patterns[surface] = re.compile(r"\s+".join(re.escape(w) for w in words)) if words else None
        return self._patterns[surface]

    def relocate(self, surface: str, near: int) -> tuple[int, int] | None | str:
        """The occurrence of `surface` nearest to `near` (spacing and line ends may differ: CRLF, double
        spaces); None when there is none; "limit" when the text was searched too often already."""
        pattern = self._pattern(surface)
        if pattern is None:
            return None
        near = min(max(near, 0), len(self.text))
        found = [(m.start(), m.end()) for m in pattern.finditer(self.text, max(0, near - NEAR), near + len(surface) + NEAR)]
        if not found:
            if surface not in self._everywhere:
                if self.searches_left <= 0:
                    return "limit"
                self.searches_left -= 1
                self._everywhere[surface] = [(m.start(), m.end()) for m in pattern.finditer(self.text)]
            found = self._everywhere[surface]
        return min(found, key=lambda m: abs(m[0] - near)) if found else None


def check_spans(text: str | _Text, results: Sequence[dict[str, Any]], target: NerTarget) -> Checked:
    """The target's labeled spans in `results`, each exact (`text[start:end] == span.text`), repaired or dropped."""
    source = text if isinstance(text, _Text) else _Text(text)
    text = source.text
    checked = Checked()
    known = set(target.label_names)
    for result in results:
        if not isinstance(result, dict) or not target.owns(result):
            continue
        value = result.get("value")
        if not isinstance(value, dict):
            checked.counts["dropped_no_value"] += 1
            continue
        labels = value.get("labels")
        label = labels[0] if isinstance(labels, list) and labels and isinstance(labels[0], str) else None
        if label not in known:
            checked.counts["dropped_unknown_label"] += 1
            continue
        start, end, surface = value.get("start"), value.get("end"), value.get("text")
        integers = type(start) is int and type(end) is int
        offsets_ok = integers and 0 <= start < end <= len(text)
        if not isinstance(surface, str) or not surface.strip():
            if offsets_ok and text[start:end].strip():
                checked.spans.append(Span(start, end, text[start:end], label))
                checked.counts["ok"] += 1
            else:
                checked.counts["dropped_bad_offsets"] += 1
            continue
        if offsets_ok and text[start:end] == surface:
            checked.spans.append(Span(start, end, surface, label))
            checked.counts["ok"] += 1
            continue
        if integers:
            a, b = source.from_utf16(start), source.from_utf16(end)
            if a is not None and b is not None and a < b and text[a:b] == surface:
                checked.spans.append(Span(a, b, surface, label))
                checked.counts["repaired"] += 1
                continue
        found = source.relocate(surface, start if integers else 0)
        if found == "limit":
            checked.counts["dropped_search_limit"] += 1
            continue
        if found is None:
            checked.counts["dropped_not_in_text"] += 1
            continue
        checked.spans.append(Span(found[0], found[1], text[found[0]:found[1]], label))
        checked.counts["repaired"] += 1
    unique = sorted(set(checked.spans))
    checked.counts["dropped_duplicate"] += len(checked.spans) - len(unique)
    checked.spans = unique
    return checked


def annotation_targets(
    schema: NerSchema, data: dict[str, Any], results: Sequence[dict[str, Any]], where: str, max_chars: int | None = None
):
    """target key -> (text, exact spans) for every target of the schema, and the span counts."""
    targets: dict[str, tuple[str, list[Span]]] = {}
    counts: Counter = Counter()
    for target in schema.targets:
        text = data.get(target.data_key)
        if not isinstance(text, str):
            raise BadRequest(f"{where}: task.data has no text under '{target.data_key}' (the <Text> value ${target.data_key})")
        if max_chars is not None and len(text) > max_chars:
            raise BadRequest(
                f"{where}: task.data.{target.data_key} has {len(text)} characters, more than MAX_TEXT_CHARS={max_chars}",
                status=413,
            )
        checked = check_spans(text, results, target)
        targets[target.key] = (text, checked.spans)
        counts.update(checked.counts)
    return targets, counts


# ---- the events ----
def _too_many(items: object, limit: int, where: str) -> None:
    if isinstance(items, list) and len(items) > limit:
        raise BadRequest(f"{where} has {len(items)} items, more than the {limit} one webhook may carry", status=413)


def _learn(
    event: str, annotation_id: int, task_id: int, data: dict[str, Any], result: list[dict[str, Any]], cancelled: bool,
    updated_at: float, schema: NerSchema, store: ExampleStore, settings: Settings,
) -> Learned:
    """Store one annotation (already validated, or read from Label Studio) as its task's example."""
    if cancelled:
        removed = store.forget_annotation(annotation_id)
        log.info("%s: annotation %s was skipped: not an example (%d rows removed)", event, annotation_id, removed)
        return Learned("skipped")
    targets, counts = annotation_targets(schema, data, result, f"{event} task {task_id}", settings.max_text_chars)
    for outcome, count in (+counts).items():
        SPANS.labels(outcome).inc(count)
    if set(+counts) - {"ok"}:
        log.info("%s: annotation %s: spans %s", event, annotation_id, dict(counts))
    outcome = store.upsert_annotation(annotation_id, task_id, updated_at, targets, limit=settings.max_examples,
                                      max_chars=settings.max_example_chars)
    if outcome == "full":
        log.warning("%s: annotation %s not stored: project %s holds MAX_EXAMPLES=%d annotations or MAX_EXAMPLE_CHARS=%d"
                    " characters of text", event, annotation_id, store.project_id, settings.max_examples, settings.max_example_chars)
        return Learned("full: MAX_EXAMPLES or MAX_EXAMPLE_CHARS reached")
    log.info("%s: annotation %s of task %s: %s", event, annotation_id, task_id, outcome)
    valid = outcome in ("stored", "unchanged")
    return Learned(outcome, result=list(result) if valid else None, annotation_id=annotation_id)


def on_annotation(event: str, payload: dict[str, Any], schema: NerSchema, store: ExampleStore, settings: Settings) -> Learned:
    raw = payload.get("annotation")
    _too_many(raw.get("result") if isinstance(raw, dict) else None, MAX_RESULTS, "annotation.result")
    annotation = validated(EventAnnotation, raw, "annotation")
    if annotation.was_cancelled:
        return _learn(event, annotation.id, 0, {}, [], True, annotation.updated_at, schema, store, settings)
    task = validated(EventTask, payload.get("task"), "task")
    task_ref = annotation.task.get("id") if isinstance(annotation.task, dict) else annotation.task
    if task_ref is not None and task_ref != task.id:
        raise BadRequest(f"annotation.task ({task_ref}) is not task.id ({task.id})")
    return _learn(
        event, annotation.id, task.id, task.data, annotation.result, False, annotation.updated_at, schema, store, settings
    )


def _task_id(payload: dict[str, Any]) -> int | None:
    """The annotation's task id, from the annotation or the task of the payload."""
    annotation = payload.get("annotation") if isinstance(payload.get("annotation"), dict) else {}
    ref = annotation.get("task")
    ref = ref.get("id") if isinstance(ref, dict) else ref
    if ref is None and isinstance(payload.get("task"), dict):
        ref = payload["task"].get("id")
    if ref is None:
        return None
    return validated(Ref, {"id": ref}, "annotation.task").id


def on_verified_annotation(
    event: str, payload: dict[str, Any], schema: NerSchema, store: ExampleStore, settings: Settings, source: LabelStudioSource
) -> Learned:
    """The payload only says which annotation changed: what it is now is read from Label Studio."""
    annotation_id = validated(Ref, payload.get("annotation"), "annotation").id
    task_id = _task_id(payload)
    if task_id is None:
        raise BadRequest("annotation.task or task.id: missing (which task the annotation belongs to)")
    project_id = int(store.project_id)
    task = source.tasks(project_id, [task_id]).get(task_id)
    annotation = next((a for a in task["annotations"] if a["id"] == annotation_id), None) if task else None
    if annotation is None:
        if source.annotation_exists(annotation_id):
            raise BadRequest(f"Label Studio has annotation {annotation_id}, but not in task {task_id} of project {project_id}")
        # deleted, or never made: only an annotation the store holds is forgotten (and barred), so that
        # an event naming ids Label Studio has not given out yet cannot refuse them when they come
        removed = store.delete_annotations(store.known([annotation_id]))
        log.info("%s: annotation %s is not in Label Studio: %d rows removed", event, annotation_id, removed)
        return Learned("gone")
    return _learn(
        event, annotation_id, task_id, task["data"], annotation["result"] if isinstance(annotation["result"], list) else [],
        annotation["was_cancelled"], timestamp(annotation["updated_at"]), schema, store, settings,
    )


def _deleted_ids(payload: dict[str, Any]) -> list[int]:
    items = payload.get("annotations")
    if not isinstance(items, list):
        raise BadRequest("ANNOTATIONS_DELETED: 'annotations' must be a list of {id}")
    _too_many(items, MAX_DELETED_IDS, "annotations")
    ids = []
    for i, item in enumerate(items):
        value = item.get("id") if isinstance(item, dict) else None
        if type(value) is int and 1 <= value <= MAX_ID:
            ids.append(value)
        else:
            ids.append(validated(Ref, item, f"annotations[{i}]").id)
    return ids


def on_deleted(payload: dict[str, Any], store: ExampleStore, trust: Trust, source: LabelStudioSource | None) -> Learned:
    ids = _deleted_ids(payload)
    if source is not None:
        # applied only to what Label Studio no longer has
        known = store.known(ids)
        present = {a["id"] for task in source.tasks(int(store.project_id), sorted(set(known.values()))).values()
                   for a in task["annotations"]}
        targets = [i for i in known if i not in present]
    elif trust.authenticated:
        # a trusted caller: remember every id, so that a late ANNOTATION_UPDATED cannot bring one back
        targets = ids
    else:
        # anyone may call: only annotations the store holds, so that ids never seen cannot be barred for ever
        targets = list(store.known(ids))
    removed = store.delete_annotations(targets)
    log.info("ANNOTATIONS_DELETED: %d ids, %d applied, %d example rows removed", len(ids), len(targets), removed)
    return Learned("deleted")


def on_tasks_created(payload: dict[str, Any], store: ExampleStore, settings: Settings, trust: Trust,
                     source: LabelStudioSource | None) -> Learned:
    """The new tasks for the warm start: read from Label Studio, or taken from an authenticated payload."""
    if not settings.warm_start:
        return Learned("ignored")
    if not settings.llm_cache:
        return Learned("ignored: the warm start fills the response cache, and LLM_CACHE is off")
    if not (trust.authenticated or source is not None):
        log.info("TASKS_CREATED: no warm start from an unauthenticated, unverified webhook")
        return Learned("ignored: warm start needs an authenticated or verified webhook")
    items = payload.get("tasks") if isinstance(payload.get("tasks"), list) else []
    _too_many(items, MAX_NEW_TASKS, "tasks")
    if source is not None:
        ids = [validated(Ref, item, f"tasks[{i}]").id for i, item in enumerate(items)]
        # only what Label Studio shows as new and not yet predicted or annotated: an event naming old
        # or predicted tasks (forged, or sent again) pays for nothing
        since = time.time() - settings.warm_start_window
        tasks = [{"id": t["id"], "data": t["data"]} for t in source.tasks(int(store.project_id), ids).values()
                 if not t["predictions"] and not t["annotated"] and t["created_at"] is not None
                 and timestamp(t["created_at"]) >= since]
        if len(tasks) < len(ids):
            log.info("TASKS_CREATED: %d of %d tasks are new in Label Studio, without prediction: warm-started", len(tasks), len(ids))
    else:
        tasks = [validated(EventTask, item, f"tasks[{i}]").model_dump(include={"id", "data"}) for i, item in enumerate(items)]
    # a text too long to pre-label is not worth a background LLM call either
    tasks = [t for t in tasks if all(not isinstance(v, str) or len(v) <= settings.max_text_chars for v in t["data"].values())]
    return Learned("warm start" if tasks else "no tasks", tasks=tasks)


# ---- START_TRAINING: rebuild from Label Studio ----
def rebuild(schema: NerSchema, store: ExampleStore, source: LabelStudioSource, max_chars: int | None = None) -> int:
    """Read every annotation of the project from Label Studio and make the examples exactly those."""
    started_at = time.time()
    annotations = []
    counts: Counter = Counter()
    for task in source.all_tasks(int(store.project_id)):
        for annotation in task["annotations"]:
            if annotation["was_cancelled"]:
                continue
            try:
                targets, checked = annotation_targets(schema, task["data"], annotation["result"], f"task {task['id']}", max_chars)
            except BadRequest as error:
                log.warning("START_TRAINING: annotation %s skipped: %s", annotation["id"], error)
                continue
            counts.update(checked)
            annotations.append((int(annotation["id"]), int(task["id"]), timestamp(annotation["updated_at"]), targets))
    count = store.replace_all(annotations, started_at)
    log.info("START_TRAINING: project %s rebuilt: %d example rows from %d annotations; spans %s",
             store.project_id, count, len(annotations), dict(counts))
    return count


def on_start_training(
    schema: NerSchema, store: ExampleStore, settings: Settings, source: LabelStudioSource | None, rebuilds: OnePerKey
) -> Learned:
    if source is None:
        raise ConfigError(
            "START_TRAINING: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY so the backend can read the project's annotations"
        )
    if not rebuilds.claim(store.project_id):
        return Learned("already rebuilding")
    # every worker and process: at most one rebuild per START_TRAINING_INTERVAL (each lists the whole project)
    since = store.db.claim_interval(store.project_id, "rebuild", settings.start_training_interval)
    if since is not None:
        rebuilds.release(store.project_id)
        log.info("START_TRAINING: project %s was rebuilt %.0f s ago (START_TRAINING_INTERVAL=%g): skipped",
                 store.project_id, since, settings.start_training_interval)
        return Learned("skipped: rebuilt recently")

    def work() -> None:
        try:
            rebuild(schema, store, source, settings.max_text_chars)
        except Exception as error:
            log.warning("START_TRAINING: rebuilding project %s failed: %s", store.project_id, describe_error(error))
        finally:
            rebuilds.release(store.project_id)

    threading.Thread(target=work, name=f"rebuild-{store.project_id}", daemon=True).start()
    return Learned("rebuilding")


def handle(
    event: str, payload: dict[str, Any], schema: NerSchema, store: ExampleStore, settings: Settings, rebuilds: OnePerKey,
    trust: Trust | None = None, source: LabelStudioSource | None = None,
) -> Learned:
    """Apply one webhook event. Bad payloads raise BadRequest; Label Studio unreachable (when events are
    verified) raises LabelStudioUnavailable."""
    trust = trust or Trust(authenticated=False, verified=source is not None)
    if event in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        if source is not None:
            return on_verified_annotation(event, payload, schema, store, settings, source)
        return on_annotation(event, payload, schema, store, settings)
    if event == "ANNOTATIONS_DELETED":
        return on_deleted(payload, store, trust, source)
    if event == "START_TRAINING":
        return on_start_training(schema, store, settings, source, rebuilds)
    if event == "TASKS_CREATED":
        return on_tasks_created(payload, store, settings, trust, source)
    log.debug("webhook %s: nothing to learn from", event)
    return Learned("ignored")

