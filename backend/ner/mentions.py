"""The words of the NER task, shared by every layer that speaks of what the LLM lists.

A `Mention` is one entity as the LLM lists it: its surface text and its label, with no position
(a `spans.alignment.Span` is a mention placed in a text). A `FewShotExample` is a text with its
mentions, as it is shown to the LLM.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import NamedTuple


class Mention(NamedTuple):
    text: str
    label: str


class Listing(list):
    """The mentions of one answer, in its order, with the occurrence hint the LLM gave each (a little
    of the text around it, see spans/alignment.py; None where it gave none). A list of `Mention`
    like any other: what does not use hints need not know of them."""

    def __init__(self, mentions: Sequence[Mention] = (), contexts: Sequence[str | None] = ()):
        super().__init__(mentions)
        self.contexts = list(contexts)


@dataclass(frozen=True)
class FewShotExample:
    text: str
    # every labeled span's mention, in order of appearance
    entities: tuple[Mention, ...]
    task_id: int | None = None
    annotation_id: int | None = None
    # mentions the LLM proposed here and the annotator deleted: shown as "not entities"
    rejected: tuple[Mention, ...] = ()
    # where each entity starts in `text`, when known: lets a prompt show occurrence hints
    starts: tuple[int, ...] = ()

    @cached_property
    def labels(self) -> frozenset[str]:
        return frozenset(label for _, label in self.entities)


def entities_json(mentions: Sequence[tuple[str, str]]) -> str:
    """`{"entities": [{"text", "label"}]}`: the answer the prompt asks for, as a perfect model writes it."""
    return _entities_json(tuple(mentions))


@lru_cache(maxsize=256)  # the same few-shot examples are rendered for task after task
def _entities_json(mentions: tuple[tuple[str, str], ...]) -> str:
    return json.dumps({"entities": entities_list(mentions)}, ensure_ascii=False)


def entities_list(mentions: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"text": text, "label": label} for text, label in mentions]
