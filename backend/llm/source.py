"""Where a text's entities come from: the response cache, else the LLM, scored (see confidence.py).

Packing (packing.py) and warm start fill the same cache under the same keys, so /predict finds
their answers as if it had asked for each text alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.ner import confidence
from backend.llm.cache import ResponseCache, cache_key
from backend.learning.selection import FewShotExample
from backend.llm.client import Answer, LLMClient, Usage
from backend.ner.task import NerTask

Entity = tuple[str, str]


@dataclass
class Found:
    entities: list[Entity]
    scores: dict[Entity, float] = field(default_factory=dict)  # lowest score per (text, label)
    empty_score: float | None = None  # confidence that the text has no entity, when it has none
    usage: Usage = field(default_factory=Usage)
    cached: bool = False

    def to_cache(self) -> dict[str, Any]:
        return {
            "entities": [list(e) for e in self.entities],
            "scores": [[t, l, s] for (t, l), s in self.scores.items()],
            "empty_score": self.empty_score,
        }

    @classmethod
    def from_cache(cls, value: dict[str, Any]) -> "Found":
        return cls(
            entities=[(t, l) for t, l in value["entities"]],
            scores={(t, l): s for t, l, s in value.get("scores", [])},
            empty_score=value.get("empty_score"),
            cached=True,
        )


def _min_scores(entities: Sequence[Entity], scores: Sequence[float | None]) -> dict[Entity, float]:
    out: dict[Entity, float] = {}
    for entity, score in zip(entities, scores):
        if score is not None:
            out[entity] = min(score, out.get(entity, score))
    return out


def found_from_answer(answer: Answer[Any], to_entities=lambda value: [(e.text, e.label) for e in value]) -> Found:
    """Entities and their scores from the LLM's answer (all samples, and logprobs when present)."""
    samples = [to_entities(value) for value in answer.values]
    if len(samples) > 1:
        entities, scores = confidence.agreement(samples)
        return Found(entities, scores, confidence.empty_share(samples) if not entities else None, answer.usage)
    entities = samples[0]
    choice = answer.completion.choices[0] if answer.completion.choices else None
    tokens = choice.logprobs if choice is not None else None
    content = choice.content if choice is not None else None
    scores = _min_scores(entities, confidence.logprob_scores(content, tokens, entities))
    empty = confidence.answer_probability(tokens) if not entities else None
    return Found(entities, scores, empty, answer.usage)


class EntitySource:
    def __init__(self, llm: LLMClient, cache: ResponseCache | None = None, scope: str = ""):
        self.llm = llm
        self.cache = cache
        self.scope = scope  # the model_version: a new version never reuses an old answer
        self.samples = llm.settings.llm_samples
        self.temperature = llm.settings.llm_sample_temperature if self.samples > 1 else 0.0
        self._prefilled: dict[str, Found] = {}  # answers packing got for this request, by key

    def key(self, task: NerTask, messages: list[dict[str, str]]) -> str:
        return cache_key(
            scope=self.scope,
            model=self.llm.model,
            messages=messages,
            schema=task.json_schema(),
            samples=self.samples,
            temperature=self.temperature,
            max_tokens=self.llm.settings.llm_max_tokens,
        )

    def cached(self, task: NerTask, text: str, examples: Sequence[FewShotExample]) -> tuple[str, Found | None]:
        key = self.key(task, task.messages(text, examples))
        value = self.cache.get(key) if self.cache is not None else None
        return key, Found.from_cache(value) if value is not None else None

    def remember(self, key: str, found: Found) -> None:
        if self.cache is not None:
            self.cache.put(key, found.to_cache())

    def flush(self) -> None:
        """Write the answers of this request to the shared cache (see ResponseCache.flush)."""
        if self.cache is not None:
            self.cache.flush()

    def prefill(self, key: str, found: Found) -> None:
        """An answer got another way (a packed call): served by `find` as if asked alone, and cached."""
        self._prefilled[key] = found
        self.remember(key, found)

    def find(self, task: NerTask, text: str, examples: Sequence[FewShotExample] = ()) -> Found:
        messages = task.messages(text, examples)
        key = self.key(task, messages)
        prefilled = self._prefilled.pop(key, None)
        if prefilled is not None:
            return prefilled
        if self.cache is not None:
            value = self.cache.get(key)
            if value is not None:
                return Found.from_cache(value)
        answer = self.llm.ask_full(
            messages, task.parse, task.repair_prompt, task.json_schema(),
            samples=self.samples, temperature=self.temperature,
        )
        found = found_from_answer(answer)
        self.remember(key, found)
        return found
