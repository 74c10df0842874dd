"""The few-shot example type: a text and its human-corrected entities, in order of appearance."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FewShotExample:
    text: str
    # (surface text, label) for every labeled span, in order of appearance
    entities: tuple[tuple[str, str], ...]
    task_id: int | None = None
    annotation_id: int | None = None
