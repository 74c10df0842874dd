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
from typing import Any, Self

from backend.infra import metrics
from backend.infra.deadline import map_in_order
from backend.infra.errors import BackendError, LLMOutputError
from backend.infra.settings import Settings
from backend.infra.usage import Usage
from backend.llm.cache import ResponseCache, cache_key
from backend.llm.client import Answer, LLMClient
from backend.ner import confidence
from backend.ner.constraints import MAX_TOKENS, MIN_TOKENS, EntitySchema, TextLimits
from backend.ner.mentions import FewShotExample, Mention
from backend.ner.packing import pack_examples, pack_messages, pack_repair_prompt, pack_schema, parse_packed
from backend.ner.task import NerTask
from backend.spans.alignment import align

log = logging.getLogger(__name__)

# How large an enum of entity texts each structured-output form takes (ner/constraints.py); the forms
# that send no schema constrain nothing. json_schema: OpenAI's strict structured outputs (1,000 enum
# values per schema, 15,000 characters over them); vLLM and llama.cpp's server take as much.
# json_object_schema: llama-cpp-python compiles the enum into a grammar whose size slows every token it
# samples (measured in docs/benchmarks.md: 882 candidates sampled ~20 times slower than the plain
# schema), so it gets a sentence's or a paragraph's worth, not a page's.
TEXT_LIMITS = {
    "json_schema": TextLimits(max_values=1000, max_chars=15_000),
    "json_object_schema": TextLimits(max_values=256, max_chars=4_000),
}


def describe_entity_texts(mode: str | None, constrain: bool, names: bool = True) -> str:
    """What `llm-ner doctor` says of entity texts with this structured-output form."""
    if not constrain:
        return "free (CONSTRAIN_ENTITY_TEXTS=false): texts not in the task are dropped, and an answer of only such texts is asked again"
    limits = TEXT_LIMITS.get(mode or "")
    if limits is None:
        return f"free: structured output {mode or 'none'} takes no schema (an answer of only texts not in the task is asked again)"
    return (
        f"constrained to spans of the task text ({mode}: an enum of its n-grams of {MIN_TOKENS} to {MAX_TOKENS} words"
        f"{' that begin and end with a word holding a capital or a digit, in a text that has capitals' if names else ''},"
        f" at most {limits.max_values} values and {limits.max_chars:,} characters, roughly a text of"
        f" {limits.max_values // MIN_TOKENS} words;"
        " longer texts and chunks use the plain schema, said in the log)"
    )


def unplaced(task: NerTask, text: str, mentions: Sequence[Mention]) -> str | None:
    """None when the answer listed no entity or at least one of them can be placed in the text; else
    why none can (for the repair turn): the texts that are not in it, the labels that are not allowed."""
    if not mentions:
        return None
    known = task.target.label_set
    usable = [(m.text, m.label) for m in mentions if m.label in known and m.text.strip()]
    # the usual answer has an entity copied exactly: placing that one alone settles it cheaply
    exact = next((item for item in usable if item[0].strip() in text), None)
    options = {"label_all_mentions": False, "allow_overlap": True}
    if exact is not None and align(text, [exact], **options).spans:
        return None
    if usable and align(text, usable, **options).spans:
        return None
    # those with a known label could not be placed; the others, only when their text is not in it
    missing = list(dict.fromkeys(m.text.strip() for m in mentions if m.text.strip() and (m.label in known or m.text.strip() not in text)))
    labels = list(dict.fromkeys(m.label for m in mentions if m.label not in known))
    why = []
    if missing:
        quoted = ", ".join(f'"{t[:80]}"' for t in missing[:10])
        why.append(f"these entity texts do not occur in the text: {quoted}")
    if labels:
        quoted = ", ".join(f'"{label[:40]}"' for label in labels[:10])
        why.append(f"these labels are not among the allowed ones: {quoted}")
    return (
        "none of the entities you listed can be found in the text; " + "; ".join(why)
        + '. Each "text" must be copied exactly, character for character, from the text you were given'
    )


def placed_parser(task: NerTask, text: str):
    """`task.parse`, refusing an answer none of whose entities is in the text: it gets the repair
    turn, and failing again fails the task (asked again later) instead of storing "no entities"."""

    def parse(content: str | None) -> list[Mention]:
        mentions = task.parse(content)
        error = unplaced(task, text, mentions)
        if error is not None:
            raise LLMOutputError(error)
        return mentions

    return parse


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
        self, llm: LLMClient, cache: ResponseCache | None = None, scope: str = "", samples: int = 1, temperature: float = 0.7,
        constrain: bool = True, names: bool = True,
    ):
        self.llm = llm
        self.cache = cache
        self.scope = scope  # the model_version: a new version never reuses an old answer
        self.samples = samples
        self.temperature = temperature if samples > 1 else 0.0  # one answer: the most likely one
        self.constrain = constrain  # CONSTRAIN_ENTITY_TEXTS
        self.names = names  # ENTITY_TEXT_CANDIDATES=names
        self._prefilled: dict[str, Found] = {}  # answers packing got for this request, by key
        self._said: set[str] = set()  # the schema kinds this source has logged at INFO (once each)

    @classmethod
    def from_settings(cls, settings: Settings, llm: LLMClient, cache: ResponseCache | None = None, scope: str = "") -> Self:
        return cls(llm, cache, scope, settings.llm_samples, settings.llm_sample_temperature, settings.constrain_entity_texts,
                   settings.entity_text_candidates == "names")

    def schema(self, task: NerTask, text: str, say: bool = True) -> EntitySchema:
        """The answer's schema for `text`: its entity texts constrained to its spans where the
        endpoint's structured-output form constrains decoding and the spans fit its limits
        (`say`: count it in /metrics and the log)."""
        if self.constrain:
            self.llm.prepare()  # the probe decides the structured-output form, so whether it constrains
        mode = self.llm.mode if self.constrain else None
        limits = TEXT_LIMITS.get(mode) if mode is not None else None
        chosen = task.schema_for(text, limits, self.names)
        if not say:
            return chosen
        metrics.ENTITY_TEXTS.labels(chosen.kind).inc()
        if chosen.constrained:
            said, message, args = "spans", "entity texts constrained to spans of the text (%s, %d candidates)", (mode, chosen.candidates)
        elif limits is not None:
            # said for every such text: a user should know which texts went unconstrained
            said, message, args = "", (
                "entity texts not constrained for a text of %d characters: %d candidates of %d tokens or fewer exceed "
                "the %s limits (%d values, %d characters); the plain schema is used"
            ), (len(text), chosen.candidates, chosen.tokens, mode, limits.max_values, limits.max_chars)
        else:
            why = "CONSTRAIN_ENTITY_TEXTS is off" if not self.constrain else f"structured output {mode} takes no schema"
            said, message, args = "free", "entity texts not constrained (%s)", (why,)
        if said in self._said:
            log.debug(message, *args)
        else:
            log.info(message, *args)
            if said:
                self._said.add(said)
        return chosen

    def key(self, task: NerTask, messages: list[dict[str, str]], schema: dict[str, Any] | None = None) -> str:
        return cache_key(
            scope=self.scope,
            model=self.llm.model,
            messages=messages,
            schema=task.json_schema() if schema is None else schema,
            samples=self.samples,
            temperature=self.temperature,
            max_tokens=self.llm.max_tokens,
        )

    def cached(self, request: TextRequest) -> tuple[str, Found | None]:
        schema = self.schema(request.task, request.text, say=False).schema
        key = self.key(request.task, request.task.messages(request.text, request.examples), schema)
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
        chosen = self.schema(task, text)
        if chosen.known_empty:
            # no span of the text a name could be (constraints.py): the one answer constrained decoding
            # could give is none, so none is asked for, whatever the provider makes of `maxItems: 0`
            return Found([], empty_score=1.0)
        messages = task.messages(text, examples)
        schema = chosen.schema
        key = self.key(task, messages, schema)
        prefilled = self._prefilled.pop(key, None)
        if prefilled is not None:
            return prefilled
        if self.cache is not None:
            value = self.cache.get(key)
            if value is not None:
                return Found.from_cache(value)
        answer = self.llm.ask_full(
            messages, placed_parser(task, text), task.repair_prompt, schema,
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
            if self.schema(request.task, request.text, say=False).known_empty:
                continue  # answered without a call by `find`: a pack would only pay for it
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
        for i, (key, request) in zip(ids, pack):
            if i in found and unplaced(task, request.text, found[i].entities) is not None:
                del found[i]  # none of its entities is in it: asked alone, with its repair turn
            if i in found:
                self._prefilled[key] = found[i]
                self.remember(key, found[i])
        metrics.PACKED_TASKS.labels("answered").inc(len(found))
        metrics.PACKED_TASKS.labels("left_out").inc(len(pack) - len(found))
        return len(found)
