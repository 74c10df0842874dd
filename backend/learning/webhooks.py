"""Label Studio's webhook events, turned into example-store operations (see PROTOCOL.md for payloads).

ANNOTATION_CREATED / ANNOTATION_UPDATED store the annotation's spans as the task's example; skipped or
cancelled annotations are not examples; ANNOTATIONS_DELETED removes what those annotations made;
START_TRAINING rebuilds the project's examples from Label Studio through the SDK. Single-annotation
events are one SQLite transaction, committed before the answer (so an acknowledged correction
survives a kill -9); the rebuild runs in a background thread after the answer, since Label Studio
waits only 1 s for a webhook.

Nothing here trusts the payload: /webhook is open (Label Studio sends no basic auth), so every field
is validated, every span checked against the text, and payloads (which carry the project's token)
are never logged whole.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter as PromCounter
from pydantic import Field

from backend.infra.errors import BadRequest, ConfigError
from backend.infra.guards import OnePerKey
from backend.infra.payloads import Lenient, validated
from backend.infra.settings import Settings
from backend.learning.store import ExampleStore, timestamp
from backend.ner.labelconfig import NerSchema, NerTarget
from backend.spans.alignment import Span

log = logging.getLogger(__name__)

SPANS = PromCounter("llm_ner_example_spans_total", "Spans of human annotations, by outcome", ["outcome"])


class EventAnnotation(Lenient):
    id: int
    task: int | dict[str, Any] | None = None
    result: list[dict[str, Any]] = Field(default_factory=list)
    was_cancelled: bool = False
    updated_at: str | float | None = None


class EventTask(Lenient):
    id: int
    data: dict[str, Any]


class DeletedAnnotation(Lenient):
    id: int


# ---- checking human spans against the text ----
@dataclass
class Checked:
    spans: list[Span] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # ok / repaired / dropped_<reason>


def _utf16_to_index(text: str, units: int) -> int | None:
    """The code-point index at `units` UTF-16 code units (a browser's offsets, when emoji precede)."""
    count = 0
    for index, char in enumerate(text):
        if count == units:
            return index
        count += 2 if ord(char) > 0xFFFF else 1
    return len(text) if count == units else None


def _relocate(text: str, surface: str, near: int) -> tuple[int, int] | None:
    """The occurrence of `surface` nearest to `near`; spacing and line ends may differ (CRLF, double spaces)."""
    words = surface.split()
    if not words:
        return None
    pattern = re.compile(r"\s+".join(re.escape(w) for w in words))
    matches = [(m.start(), m.end()) for m in pattern.finditer(text)]
    if not matches:
        return None
    return min(matches, key=lambda m: abs(m[0] - near))


def check_spans(text: str, results: Sequence[dict[str, Any]], target: NerTarget) -> Checked:
    """The target's labeled spans in `results`, each exact (`text[start:end] == span.text`), repaired or dropped."""
    checked = Checked()
    known = set(target.label_names)
    for result in results:
        if not isinstance(result, dict) or result.get("from_name") != target.from_name:
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
        offsets_ok = isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text)
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
        near = start if isinstance(start, int) else 0
        if isinstance(start, int) and isinstance(end, int):
            a, b = _utf16_to_index(text, start), _utf16_to_index(text, end)
            if a is not None and b is not None and text[a:b] == surface:
                checked.spans.append(Span(a, b, surface, label))
                checked.counts["repaired"] += 1
                continue
        found = _relocate(text, surface, near)
        if found is None:
            checked.counts["dropped_not_in_text"] += 1
            continue
        checked.spans.append(Span(found[0], found[1], text[found[0]:found[1]], label))
        checked.counts["repaired"] += 1
    unique = sorted(set(checked.spans))
    checked.counts["dropped_duplicate"] += len(checked.spans) - len(unique)
    checked.spans = unique
    return checked


def annotation_targets(schema: NerSchema, data: dict[str, Any], results: Sequence[dict[str, Any]], where: str):
    """from_name -> (text, exact spans) for every target of the schema, and the span counts."""
    targets: dict[str, tuple[str, list[Span]]] = {}
    counts: Counter = Counter()
    for target in schema.targets:
        text = data.get(target.data_key)
        if not isinstance(text, str):
            raise BadRequest(f"{where}: task.data has no text under '{target.data_key}' (the <Text> value ${target.data_key})")
        checked = check_spans(text, results, target)
        targets[target.from_name] = (text, checked.spans)
        counts.update(checked.counts)
    return targets, counts


# ---- the events ----
def on_annotation(event: str, payload: dict[str, Any], schema: NerSchema, store: ExampleStore) -> str:
    annotation = validated(EventAnnotation, payload.get("annotation"), "annotation")
    if annotation.was_cancelled:
        removed = store.forget_annotation(annotation.id)
        log.info("%s: annotation %s was skipped: not an example (%d rows removed)", event, annotation.id, removed)
        return "skipped"
    task = validated(EventTask, payload.get("task"), "task")
    task_ref = annotation.task.get("id") if isinstance(annotation.task, dict) else annotation.task
    if task_ref is not None and task_ref != task.id:
        raise BadRequest(f"annotation.task ({task_ref}) is not task.id ({task.id})")
    targets, counts = annotation_targets(schema, task.data, annotation.result, f"{event} task {task.id}")
    for outcome, count in (+counts).items():
        SPANS.labels(outcome).inc(count)
    if set(+counts) - {"ok"}:
        log.info("%s: annotation %s: spans %s", event, annotation.id, dict(counts))
    outcome = store.upsert_annotation(annotation.id, task.id, timestamp(annotation.updated_at), targets)
    log.info("%s: annotation %s of task %s: %s", event, annotation.id, task.id, outcome)
    return outcome


def on_deleted(payload: dict[str, Any], store: ExampleStore) -> str:
    items = payload.get("annotations")
    if not isinstance(items, list):
        raise BadRequest("ANNOTATIONS_DELETED: 'annotations' must be a list of {id}")
    ids = [validated(DeletedAnnotation, item, f"annotations[{i}]").id for i, item in enumerate(items)]
    removed = store.delete_annotations(ids)
    log.info("ANNOTATIONS_DELETED: %d annotations, %d example rows removed", len(ids), removed)
    return "deleted"


# ---- START_TRAINING: rebuild from Label Studio ----

def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def rebuild(schema: NerSchema, store: ExampleStore, url: str, api_key: str) -> int:
    """Read every annotation of the project through the SDK and make the examples exactly those."""
    from label_studio_sdk.client import LabelStudio

    started_at = time.time()
    client = LabelStudio(base_url=url, api_key=api_key)
    annotations = []
    counts: Counter = Counter()
    for task in client.tasks.list(project=int(store.project_id), fields="all"):
        data = _field(task, "data") or {}
        for annotation in _field(task, "annotations") or []:
            if _field(annotation, "was_cancelled", False):
                continue
            try:
                targets, checked = annotation_targets(schema, data, _field(annotation, "result") or [], f"task {_field(task, 'id')}")
            except BadRequest as error:
                log.warning("START_TRAINING: annotation %s skipped: %s", _field(annotation, "id"), error)
                continue
            counts.update(checked)
            annotations.append((int(_field(annotation, "id")), int(_field(task, "id")), timestamp(_field(annotation, "updated_at")), targets))
    count = store.replace_all(annotations, started_at)
    log.info("START_TRAINING: project %s rebuilt: %d example rows from %d annotations; spans %s",
             store.project_id, count, len(annotations), dict(counts))
    return count


def on_start_training(
    schema: NerSchema, store: ExampleStore, url: str | None, api_key: str | None, rebuilds: OnePerKey
) -> str:
    if not url or not api_key:
        raise ConfigError(
            "START_TRAINING: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY so the backend can read the project's annotations"
        )
    if not rebuilds.claim(store.project_id):
        return "already rebuilding"

    def work() -> None:
        try:
            rebuild(schema, store, url, api_key)
        except Exception as error:
            # the SDK's errors carry the URL and status, never the key
            log.warning("START_TRAINING: rebuilding project %s failed: %s: %s", store.project_id, type(error).__name__, error)
        finally:
            rebuilds.release(store.project_id)

    threading.Thread(target=work, name=f"rebuild-{store.project_id}", daemon=True).start()
    return "rebuilding"


def handle(
    event: str, payload: dict[str, Any], schema: NerSchema, store: ExampleStore, settings: Settings, rebuilds: OnePerKey
) -> str:
    """Apply one webhook event; returns what happened (for logs and tests). Bad payloads raise BadRequest."""
    if event in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        return on_annotation(event, payload, schema, store)
    if event == "ANNOTATIONS_DELETED":
        return on_deleted(payload, store)
    if event == "START_TRAINING":
        key = settings.label_studio_api_key.get_secret_value() if settings.label_studio_api_key else None
        return on_start_training(schema, store, settings.label_studio_url, key, rebuilds)
    log.debug("webhook %s: nothing to learn from", event)
    return "ignored"
