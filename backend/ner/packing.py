"""Packing: several short texts in one LLM call, the answer split back per text (PACK_SIZE > 1).

The system prompt and the few-shot examples are the bulk of a prompt for a short text (a CoNLL
sentence is ~30 tokens beside ~600 of instructions and examples); sent once for k texts they cost
1/k per text. Each text goes in `<text id="N">`, the model answers
`{"results": [{"id": "N", "entities": [...]}]}`, and each text's entities are stored under the key its
own single-text request would have (answers.EntitySource), so /predict, the cache and warm start see
no difference. A text the packed answer leaves out is simply asked alone afterwards.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from backend.ner import confidence
from backend.infra import metrics
from backend.llm.source import EntitySource, Found
from backend.infra.deadline import map_in_order
from backend.infra.errors import BackendError, LLMOutputError
from backend.learning.selection import FewShotExample
from backend.llm.client import Answer, Usage
from backend.ner.task import Entity, NerTask

log = logging.getLogger(__name__)

PACK_INSTRUCTIONS = """You will get several texts at once, each inside <text id="..."> tags.
Label each text on its own, exactly as if it had come alone; never move an entity from one text to another.
Answer with JSON only, in this form: {"results": [{"id": "<id>", "entities": [{"text": "<exact text>", "label": "<label>"}]}]}
with one item per text id, in the order given."""

PACK_REPAIR = """Your answer could not be used: {error}
Answer again with JSON only, in this form: {{"results": [{{"id": "<id>", "entities": [{{"text": "<exact text>", "label": "<label>"}}]}}]}}"""

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


class _Item(BaseModel):
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)

    id: str
    entities: list[Entity]


class _Packed(BaseModel):
    model_config = ConfigDict(extra="allow")

    results: list[_Item]


def pack_repair_prompt(error: str) -> str:
    # format() on our own constant only; the error text is inserted as a value, never parsed
    return PACK_REPAIR.format(error=error)


def packed_user(texts: Sequence[str]) -> str:
    blocks = "\n".join(f'<text id="{i + 1}">\n{text}\n</text>' for i, text in enumerate(texts))
    return f"Label the named entities in each of these texts:\n{blocks}"


def packed_answer(answers: Sequence[Sequence[tuple[str, str]]]) -> str:
    results = [
        {"id": str(i + 1), "entities": [{"text": t, "label": l} for t, l in entities]} for i, entities in enumerate(answers)
    ]
    return json.dumps({"results": results}, ensure_ascii=False)


def pack_messages(task: NerTask, texts: Sequence[str], examples: Sequence[FewShotExample] = ()) -> list[dict[str, str]]:
    """The system prompt with packing instructions, the examples as one packed exchange, then the texts."""
    messages = [{"role": "system", "content": task.system_prompt() + "\n\n" + PACK_INSTRUCTIONS}]
    if examples:
        messages.append({"role": "user", "content": packed_user([e.text for e in examples])})
        messages.append({"role": "assistant", "content": packed_answer([e.entities for e in examples])})
    messages.append({"role": "user", "content": packed_user(texts)})
    return messages


def pack_schema(task: NerTask) -> dict[str, Any]:
    entities = task.json_schema()["schema"]["properties"]["entities"]
    item = {
        "type": "object",
        "properties": {"id": {"type": "string"}, "entities": entities},
        "required": ["id", "entities"],
        "additionalProperties": False,
    }
    return {
        "name": "packed_entities",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"results": {"type": "array", "items": item}},
            "required": ["results"],
            "additionalProperties": False,
        },
    }


def parse_packed(content: str | None) -> dict[str, list[tuple[str, str]]]:
    """id -> (text, label) entities, in the answer's order; raises LLMOutputError for the repair turn."""
    if content is None or not content.strip():
        raise LLMOutputError("the answer was empty")
    candidates = [content.strip(), *(b.strip() for b in _FENCE.findall(content))]
    start, end = content.find("{"), content.rfind("}")
    if start != -1 and end > start:
        candidates.append(content[start : end + 1])
    error = 'no JSON object with a "results" list was found in the answer'
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        try:
            packed = _Packed.model_validate(value)
        except ValidationError as invalid:
            error = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in invalid.errors()[:5])
            continue
        return {item.id: [(e.text, e.label) for e in item.entities] for item in packed.results}
    raise LLMOutputError(error)


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


def found_per_text(answer: Answer[dict[str, list[tuple[str, str]]]], ids: Sequence[str]) -> dict[str, Found]:
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
        per = {}
        for (owner, entity), score in zip(flat, scores):
            if owner == i and score is not None:
                per[entity] = min(score, per.get(entity, score))
        found[i] = Found(list(samples[0][i]), per, None, usage)
    return found


@dataclass
class _Pending:
    key: str
    task: NerTask
    text: str
    examples: Sequence[FewShotExample]


def _pick_examples(pending: Sequence[_Pending]) -> list[FewShotExample]:
    """Round-robin over the texts' own examples, without repeats, as many as one text would get."""
    limit = max((len(p.examples) for p in pending), default=0)
    picked: list[FewShotExample] = []
    for rank in range(limit):
        for p in pending:
            if rank < len(p.examples) and p.examples[rank] not in picked and len(picked) < limit:
                picked.append(p.examples[rank])
    return picked


def prefill(prelabeler: Any, tasks: Sequence[dict[str, Any]], settings: Any, deadline: float) -> int:
    """Answer the short, uncached texts of these tasks in packs; returns how many texts got an answer."""
    pack_size, concurrency = settings.pack_size, settings.predict_concurrency
    # a text long enough to be chunked is asked chunk by chunk, under other keys: never pack it
    max_chars = min(settings.pack_max_chars, getattr(prelabeler, "context_chars", settings.pack_max_chars))
    source: EntitySource = prelabeler.source
    groups: dict[str, list[_Pending]] = {}
    seen: set[str] = set()
    for task in tasks:
        data = task.get("data") or {}
        for target in prelabeler.schema.targets:
            text = data.get(target.data_key)
            if not isinstance(text, str) or not text.strip() or len(text) > max_chars:
                continue
            ner_task = prelabeler.tasks[target.from_name]
            examples = prelabeler.select_examples(target, text)
            key, cached = source.cached(ner_task, text, examples)
            if cached is None and key not in seen:
                seen.add(key)
                groups.setdefault(target.from_name, []).append(_Pending(key, ner_task, text, examples))
    packs = [group[i : i + pack_size] for group in groups.values() for i in range(0, len(group), pack_size)]
    packs = [p for p in packs if len(p) > 1]  # a lone text is asked the ordinary way
    if not packs:
        return 0

    def ask(pack: list[_Pending]) -> int:
        task = pack[0].task
        ids = [str(i + 1) for i in range(len(pack))]
        answer = source.llm.ask_full(
            pack_messages(task, [p.text for p in pack], _pick_examples(pack)), parse_packed, pack_repair_prompt,
            pack_schema(task), samples=source.samples, temperature=source.temperature,
        )
        found = found_per_text(answer, ids)
        for i, pending in zip(ids, pack):
            if i in found:
                source.prefill(pending.key, found[i])
        metrics.PACKED_TASKS.labels("answered").inc(len(found))
        metrics.PACKED_TASKS.labels("left_out").inc(len(pack) - len(found))
        return len(found)

    # leave the per-task pass time to build the results of what the packs answered
    reserve = min(2.0, 0.1 * settings.predict_deadline)
    outcomes = map_in_order(ask, packs, concurrency=concurrency, deadline_seconds=max(0.0, deadline - reserve - time.monotonic()))
    for pack, outcome in zip(packs, outcomes):
        if outcome.error is not None:
            level = logging.WARNING if isinstance(outcome.error, BackendError) else logging.ERROR
            log.log(level, "a pack of %d texts failed (%s); they are asked one by one", len(pack), outcome.error)
    return sum(o.value or 0 for o in outcomes)
