"""Interactive pre-annotation: the regions an annotator has drawn steer the pre-labels.

Label Studio sends `/predict` with one task and `context.result` = the regions drawn so far. The
editor shows our answer as suggestions (it replaces the previous suggestions and, with auto-accept,
adds them to the annotation), so drawn regions are **not** echoed back: they are already in the
annotation, and echoing them would duplicate them. What we answer:

1. fast path, no LLM: every other mention of a marked surface gets the label it was marked with
   (a surface marked with two different labels is ambiguous and is not propagated);
2. when enabled, the LLM labels the rest of the text with the marks shown as constraints; its spans
   never overlap a drawn or propagated span and never give a marked surface another label.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backend.infra.deadline import map_in_order
from backend.ner.labelconfig import NerSchema, NerTarget
from backend.ner.templates import PromptTemplates
from backend.pipeline.prelabel import Prelabeler, span_results
from backend.spans.alignment import Span, align

log = logging.getLogger(__name__)


@dataclass
class Marks:
    """What the annotator has drawn, per target (`NerTarget.key`), checked against the task text."""

    spans: dict[str, list[Span]] = field(default_factory=dict)
    guidelines: str = ""
    ignored: int = 0

    def __bool__(self) -> bool:
        return any(self.spans.values()) or bool(self.guidelines)


def _textarea_text(value: dict[str, Any]) -> str:
    text = value.get("text")
    if isinstance(text, list):
        return "\n".join(str(t) for t in text if isinstance(t, str) and t.strip())
    return text if isinstance(text, str) else ""


def guidelines_from_results(results: list[Any], schema: NerSchema, textarea_name: str) -> str:
    """The text typed in the guidelines <TextArea> (if the config has one under that name)."""
    names = {name for names in schema.textareas.values() for name in names}
    if textarea_name not in names:
        return ""
    parts = [
        _textarea_text(r.get("value") or {})
        for r in results
        if isinstance(r, dict) and r.get("from_name") == textarea_name and isinstance(r.get("value"), dict)
    ]
    return "\n".join(p for p in parts if p).strip()


def read_marks(context: dict[str, Any] | None, schema: NerSchema, data: dict[str, Any], textarea_name: str) -> Marks:
    """Drawn label regions whose offsets match the task text; others are ignored and logged."""
    marks = Marks()
    results = (context or {}).get("result") or []
    if not isinstance(results, list):
        log.info("interactive context.result is not a list: ignored")
        return marks
    for region in results:
        # a from_name that is no name (a list, an object) is no region of ours
        target = next((t for t in schema.targets if t.owns(region)), None) if isinstance(region, dict) else None
        if target is None:
            continue
        value = region.get("value") if isinstance(region.get("value"), dict) else {}
        span = _checked_span(value, data.get(target.data_key), target)
        if span is None:
            marks.ignored += 1
            log.info("interactive mark ignored (offsets do not match the text or unknown label): %r", _safe(value))
            continue
        marks.spans.setdefault(target.key, []).append(span)
    marks.guidelines = guidelines_from_results(results, schema, textarea_name)
    return marks


def _safe(value: dict[str, Any]) -> dict[str, Any]:
    return {k: value.get(k) for k in ("start", "end", "labels")}


def _checked_span(value: dict[str, Any], text: Any, target: NerTarget) -> Span | None:
    start, end, labels = value.get("start"), value.get("end"), value.get("labels")
    if not isinstance(text, str) or not isinstance(start, int) or not isinstance(end, int):
        return None
    if not (0 <= start < end <= len(text)) or not isinstance(labels, list) or not labels:
        return None
    label = labels[0]
    if label not in target.label_names:
        return None
    surface = text[start:end]
    if isinstance(value.get("text"), str) and value["text"] != surface:
        return None
    return Span(start, end, surface, label)


def _overlaps(span: Span, others: list[Span]) -> bool:
    return any(span.start < o.end and o.start < span.end for o in others)


def unambiguous_marks(drawn: list[Span]) -> dict[str, str]:
    """surface -> label for surfaces the annotator marked with exactly one label."""
    labels: dict[str, set[str]] = defaultdict(set)
    for span in drawn:
        labels[span.text].add(span.label)
    return {surface: next(iter(ls)) for surface, ls in labels.items() if len(ls) == 1}


def propagate(text: str, drawn: list[Span]) -> list[Span]:
    """Every other mention of a marked surface, with its label: no LLM call."""
    surfaces = unambiguous_marks(drawn)
    if not surfaces:
        return []
    found = align(text, list(surfaces.items()), label_all_mentions=True).spans
    return sorted(s for s in found if not _overlaps(s, drawn))


def merge_llm(drawn: list[Span], propagated: list[Span], llm_spans: list[Span]) -> list[Span]:
    """LLM spans that neither overlap the annotator's marks nor contradict a marked surface's label."""
    marked_labels: dict[str, set[str]] = defaultdict(set)
    for span in drawn:
        marked_labels[span.text].add(span.label)
    fixed = drawn + propagated
    kept = []
    for span in llm_spans:
        if _overlaps(span, fixed):
            continue
        if span.text in marked_labels and span.label not in marked_labels[span.text]:
            continue
        kept.append(span)
    return sorted(kept)


def marks_prompt(templates: PromptTemplates, drawn: list[Span]) -> str:
    return templates.render("marks", marks=drawn) if drawn else ""


def _span_of(result: dict[str, Any]) -> Span:
    value = result["value"]
    return Span(value["start"], value["end"], value["text"], value["labels"][0])


def interactive_results(
    data: dict[str, Any],
    marks: Marks,
    schema: NerSchema,
    make_prelabeler: Callable[[str], Prelabeler],
    *,
    use_llm: bool,
    deadline_seconds: float,
    templates: PromptTemplates,
    base_guidelines: str = "",
) -> list[dict[str, Any]]:
    """The answer to one interactive /predict: propagated mentions, then the LLM's completion."""
    fixed: dict[str, tuple[list[Span], list[Span]]] = {}
    results: list[dict[str, Any]] = []
    for target in schema.targets:
        text = data.get(target.data_key)
        if not isinstance(text, str):
            continue
        drawn = marks.spans.get(target.key, [])
        propagated = propagate(text, drawn)
        fixed[target.key] = (drawn, propagated)
        results.extend(span_results(target, propagated))
    if not use_llm:
        return results

    all_drawn = [span for drawn, _ in fixed.values() for span in drawn]
    guidelines = "\n\n".join(p for p in (base_guidelines, marks.guidelines, marks_prompt(templates, all_drawn)) if p)
    prelabeler = make_prelabeler(guidelines)
    (outcome,) = map_in_order(prelabeler.prelabel, [data], concurrency=1, deadline_seconds=deadline_seconds)
    if outcome.error is not None:
        # The fast path stands alone; a slow LLM still fills the response cache for the next ask.
        log.info("interactive: answering without the LLM: %s", outcome.error)
        return results
    by_target: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in outcome.value.results:
        target = next(t for t in schema.targets if t.owns(result))
        by_target[target.key].append(result)
    for key, llm_results in by_target.items():
        drawn, propagated = fixed.get(key, ([], []))
        keep = set(merge_llm(drawn, propagated, [_span_of(r) for r in llm_results]))
        results.extend(r for r in llm_results if _span_of(r) in keep)
    return results


MAX_GUIDELINES_CHARS = 5_000  # the project's guidelines go into every prompt: a page of text at most


def submitted_guidelines(results: list[Any], schema: NerSchema, textarea_name: str) -> str | None:
    """The guidelines a submitted annotation's regions carry (an emptied box: ""), or None when they
    hold no guidelines <TextArea> result (the project's guidelines then stay as they are)."""
    if not isinstance(results, list):
        return None
    if not any(isinstance(r, dict) and r.get("from_name") == textarea_name for r in results):
        return None
    return guidelines_from_results(results, schema, textarea_name)
