"""Where a text's entities come from: the response cache, else the LLM, scored (see ner/confidence.py).

One object answers "find this text's entities" for the single path (`find`) and the packed path
(`find_packed`: several short texts in one call, each answer filed under the key the text's own
request would have), so /predict, packing and warm start share one cache and see no difference.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.infra import metrics
from backend.infra.deadline import map_in_order
from backend.infra.errors import BackendError
from backend.infra.usage import Usage
from backend.llm.cache import ResponseCache, cache_key
from backend.llm.client import Answer, LLMClient
from backend.ner import confidence
from backend.ner.mentions import FewShotExample, Mention
from backend.ner.packing import pack_examples, pack_messages, pack_repair_prompt, pack_schema, parse_packed
from backend.ner.task import NerTask

log = logging.getLogger(__name__)


@dataclass
class Found:
    entities: list[Mention]
    scores: dict[Mention, float] = field(default_factory=dict)  # lowest score per mention
    empty_score: float | None = None  # confidence that the text has no entity, when it has none
    usage: Usage = field(default_factory=Usage)
    cached: bool = False
    # the occurrence hint of each entity (None: none given); empty when the answer gave none at all
    contexts: list[str | None] = field(default_factory=list)

    def to_cache(self) -> dict[str, Any]:
        value = {
            "entities": [list(e) for e in self.entities],
            "scores": [[t, l, s] for (t, l), s in self.scores.items()],
            "empty_score": self.empty_score,
        }
        if self.contexts:
            value["contexts"] = self.contexts
        return value

    @classmethod
    def from_cache(cls, value: dict[str, Any]) -> Found:
        return cls(
            entities=[Mention(t, l) for t, l in value["entities"]],
            scores={Mention(t, l): s for t, l, s in value.get("scores", [])},
            empty_score=value.get("empty_score"),
            cached=True,
            contexts=list(value.get("contexts") or []),
        )

    def hinted(self) -> list[tuple[str, str]] | list[tuple[str, str, str | None]]:
        """The entities as alignment takes them: with their hints when the answer gave some."""
        if len(self.contexts) != len(self.entities) or not self.contexts:
            return list(self.entities)
        return [(t, l, c) for (t, l), c in zip(self.entities, self.contexts)]


@dataclass
class TextRequest:
    """One text to find entities in, with the task (prompt) and the few-shot examples for it."""

    task: NerTask
    text: str
    examples: Sequence[FewShotExample] = ()


def _min_scores(entities: Sequence[Mention], scores: Sequence[float | None]) -> dict[Mention, float]:
    out: dict[Mention, float] = {}
    for entity, score in zip(entities, scores):
        if score is not None:
            out[entity] = min(score, out.get(entity, score))
    return out


def found_from_answer(answer: Answer[list[Mention]]) -> Found:
    """Entities and their scores from the LLM's answer (all samples, and logprobs when present)."""
    samples = answer.values
    if len(samples) > 1:
        entities, scores = confidence.agreement(samples)
        return Found(entities, scores, confidence.empty_share(samples) if not entities else None, answer.usage)
    entities = samples[0]
    choice = answer.completion.choices[0] if answer.completion.choices else None
    tokens = choice.logprobs if choice is not None else None
    content = choice.content if choice is not None else None
    scores = _min_scores(entities, confidence.logprob_scores(content, tokens, entities))
    empty = confidence.answer_probability(tokens) if not entities else None
    contexts = getattr(entities, "contexts", [])  # a Listing: the answer gave occurrence hints
    return Found(entities, scores, empty, answer.usage, contexts=contexts)


def _share(usage: Usage, parts: int) -> list[Usage]:
    """Split one call's usage over the texts it answered (the first carries the call and remainders)."""
    shares = []
    for i in range(parts):
        shares.append(Usage(
            prompt_tokens=usage.prompt_tokens // parts + (usage.prompt_tokens % parts if i == 0 else 0),
            completion_tokens=usage.completion_tokens // parts + (usage.completion_tokens % parts if i == 0 else 0),
            calls=usage.calls if i == 0 else 0,
        ))
    return shares


def found_per_text(answer: Answer[dict[str, list[Mention]]], ids: Sequence[str]) -> dict[str, Found]:
    """Each text's entities and scores out of a packed answer; ids the answer left out are absent."""
    samples = answer.values
    present = [i for i in ids if i in samples[0]]
    usages = _share(answer.usage, max(1, len(present)))
    found: dict[str, Found] = {}
    if len(samples) > 1:
        for i, usage in zip(present, usages):
            per_text = [sample.get(i, []) for sample in samples]
            entities, scores = confidence.agreement(per_text)
            found[i] = Found(entities, scores, confidence.empty_share(per_text) if not entities else None, usage)
        return found
    choice = answer.completion.choices[0] if answer.completion.choices else None
    flat = [(i, e) for i in samples[0] for e in samples[0][i]]  # the order the answer wrote them in
    scores = confidence.logprob_scores(choice.content if choice else None, choice.logprobs if choice else None, [e for _, e in flat])
    for i, usage in zip(present, usages):
        per: dict[Mention, float] = {}
        for (owner, entity), score in zip(flat, scores):
            if owner == i and score is not None:
                per[entity] = min(score, per.get(entity, score))
        found[i] = Found(list(samples[0][i]), per, None, usage, contexts=getattr(samples[0][i], "contexts", []))
    return found


class EntitySource:
    def __init__(
        self, llm: LLMClient, cache: ResponseCache | None = None, scope: str = "", samples: int = 1, temperature: float = 0.7
    ):
        self.llm = llm
        self.cache = cache
        self.scope = scope  # the model_version: a new version never reuses an old answer
        self.samples = samples
        self.temperature = temperature if samples > 1 else 0.0  # one answer: the most likely one
        self._prefilled: dict[str, Found] = {}  # answers packing got for this request, by key

    def key(self, task: NerTask, messages: list[dict[str, str]]) -> str:
        return cache_key(
            scope=self.scope,
            model=self.llm.model,
            messages=messages,
            schema=task.json_schema(),
            samples=self.samples,
            temperature=self.temperature,
            max_tokens=self.llm.max_tokens,
        )

    def cached(self, request: TextRequest) -> tuple[str, Found | None]:
        key = self.key(request.task, request.task.messages(request.text, request.examples))
        value = self.cache.get(key) if self.cache is not None else None
        return key, Found.from_cache(value) if value is not None else None

    def remember(self, key: str, found: Found) -> None:
        if self.cache is not None:
            self.cache.put(key, found.to_cache())

    def flush(self) -> None:
        """Write the answers of this request to the shared cache (see ResponseCache.flush)."""
        if self.cache is not None:
            self.cache.flush()

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
            samples=self.samples, temperature=self.temperature, max_tokens=self.llm.answer_tokens(len(text)),
        )
        found = found_from_answer(answer)
        self.remember(key, found)
        return found

    def find_packed(self, requests: Sequence[TextRequest], pack_size: int, concurrency: int, deadline_seconds: float) -> int:
        """Ask the uncached texts of `requests` `pack_size` to a call (texts of one task together);
        `find` then serves each answer as if its text had been asked alone. A text a pack leaves out,
        or whose pack fails, is simply asked alone by `find`. Returns how many texts got an answer."""
        groups: dict[int, list[tuple[str, TextRequest]]] = {}
        seen: set[str] = set()
        for request in requests:
            key, cached = self.cached(request)
            if cached is None and key not in seen:
                seen.add(key)
                groups.setdefault(id(request.task), []).append((key, request))
        packs = [group[i : i + pack_size] for group in groups.values() for i in range(0, len(group), pack_size)]
        packs = [p for p in packs if len(p) > 1]  # a lone text is asked the ordinary way
        outcomes = map_in_order(self._ask_pack, packs, concurrency=concurrency, deadline_seconds=deadline_seconds)
        for pack, outcome in zip(packs, outcomes):
            if outcome.error is not None:
                level = logging.WARNING if isinstance(outcome.error, BackendError) else logging.ERROR
                log.log(level, "a pack of %d texts failed (%s); they are asked one by one", len(pack), outcome.error)
        return sum(o.value or 0 for o in outcomes)

    def _ask_pack(self, pack: list[tuple[str, TextRequest]]) -> int:
        task = pack[0][1].task
        ids = [str(i + 1) for i in range(len(pack))]
        texts = [r.text for _, r in pack]
        messages = pack_messages(task, texts, pack_examples([r.examples for _, r in pack]))
        answer = self.llm.ask_full(
            messages, parse_packed, functools.partial(pack_repair_prompt, task), pack_schema(task),
            samples=self.samples, temperature=self.temperature,
            # each text's answer, and `{"id": "N", "entities": []}` around it (~8 characters' worth)
            max_tokens=self.llm.answer_tokens(sum(len(t) + 8 for t in texts)),
        )
        found = found_per_text(answer, ids)
        for i, (key, _) in zip(ids, pack):
            if i in found:
                self._prefilled[key] = found[i]
                self.remember(key, found[i])
        metrics.PACKED_TASKS.labels("answered").inc(len(found))
        metrics.PACKED_TASKS.labels("left_out").inc(len(pack) - len(found))
        return len(found)
