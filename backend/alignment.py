"""Turn the LLM's (surface, label) entities into exact character spans of the original text.

Every span satisfies `text[start:end] == span.text`. Mentions are walked in order: each listed item
takes the next match of its surface after the previous item's match.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Span:
    start: int
    end: int
    text: str
    label: str


@dataclass
class Alignment:
    spans: list[Span]
    dropped: Counter = field(default_factory=Counter)  # reason -> count


def _pattern(surface: str) -> re.Pattern[str]:
    # \w-boundaries only where the surface itself starts/ends with a word character
    left = r"(?<!\w)" if surface[:1].isalnum() or surface[:1] == "_" else ""
    right = r"(?!\w)" if surface[-1:].isalnum() or surface[-1:] == "_" else ""
    return re.compile(left + re.escape(surface) + right)


def align(
    text: str,
    entities: Iterable[tuple[str, str]],
    *,
    label_all_mentions: bool = True,
) -> Alignment:
    result = Alignment(spans=[])
    taken: list[Span] = []
    cursor = 0
    labels_per_surface: dict[str, set[str]] = {}
    listed: list[tuple[str, str]] = []
    for surface, label in entities:
        if not surface or not surface.strip():
            result.dropped["empty"] += 1
            continue
        listed.append((surface, label))
        labels_per_surface.setdefault(surface, set()).add(label)
        pattern = _pattern(surface)
        match = pattern.search(text, cursor) or pattern.search(text)
        if match is None:
            result.dropped["not_found"] += 1
            continue
        taken.append(Span(match.start(), match.end(), match.group(), label))
        cursor = match.end()
    if label_all_mentions:
        for surface, labels in labels_per_surface.items():
            if len(labels) != 1:
                continue
            (label,) = labels
            for match in _pattern(surface).finditer(text):
                taken.append(Span(match.start(), match.end(), match.group(), label))
    result.spans = _resolve_overlaps(taken)
    return result


def _resolve_overlaps(spans: list[Span]) -> list[Span]:
    """Drop exact duplicates; of overlapping spans the longest wins (then the earliest)."""
    chosen: list[Span] = []
    for span in sorted(set(spans), key=lambda s: (-(s.end - s.start), s.start)):
        if all(span.end <= other.start or span.start >= other.end for other in chosen):
            chosen.append(span)
    return sorted(chosen)
