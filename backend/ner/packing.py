"""Packing: several short texts in one LLM call, the answer split back per text (PACK_SIZE > 1).

The system prompt and the few-shot examples are the bulk of a prompt for a short text (a CoNLL
sentence is ~30 tokens beside ~600 of instructions and examples); sent once for k texts they cost
1/k per text. Each text goes in `<text id="N">`, the model answers
`{"results": [{"id": "N", "entities": [...]}]}` (instructions in `prompts/pack.j2`). This module
builds the messages and parses the answer; `llm/source.py` asks and files each text's entities
under the key its own single-text request would have.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from backend.infra.errors import LLMOutputError, validation_message
from backend.ner.mentions import FewShotExample, Mention, entities_list
from backend.ner.task import NerTask, mentions_of

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


class _Item(BaseModel):
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)

    id: str
    entities: list[Any]  # checked one by one (task.mentions_of): one bad entity drops alone


class _Packed(BaseModel):
    model_config = ConfigDict(extra="allow")

    results: list[_Item]


def pack_repair_prompt(task: NerTask, error: str) -> str:
    return task.templates.render("pack_repair", error=error, hints=task.templates.hints)


def packed_user(texts: Sequence[str]) -> str:
    blocks = "\n".join(f'<text id="{i + 1}">\n{text}\n</text>' for i, text in enumerate(texts))
    return f"Label the named entities in each of these texts:\n{blocks}"


def packed_answer(answers: Sequence[Sequence[tuple[str, str]]]) -> str:
    results = [{"id": str(i + 1), "entities": entities_list(entities)} for i, entities in enumerate(answers)]
    return json.dumps({"results": results}, ensure_ascii=False)


def pack_messages(task: NerTask, texts: Sequence[str], examples: Sequence[FewShotExample] = ()) -> list[dict[str, str]]:
    """The system prompt with packing instructions, the examples as one packed exchange, then the texts."""
    messages = [{"role": "system", "content": task.system_prompt() + "\n\n" + task.templates.render("pack", hints=task.templates.hints, example=task.example)}]
    if examples:
        messages.append({"role": "user", "content": packed_user([e.text for e in examples])})
        messages.append({"role": "assistant", "content": packed_answer([e.entities for e in examples])})
    messages.append({"role": "user", "content": packed_user(texts)})
    return messages


def pack_examples(per_text: Sequence[Sequence[FewShotExample]]) -> list[FewShotExample]:
    """Round-robin over the texts' own examples, without repeats, as many as one text would get."""
    limit = max((len(examples) for examples in per_text), default=0)
    picked: list[FewShotExample] = []
    for rank in range(limit):
        for examples in per_text:
            if rank < len(examples) and examples[rank] not in picked and len(picked) < limit:
                picked.append(examples[rank])
    return picked


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


def parse_packed(content: str | None) -> dict[str, list[Mention]]:
    """id -> mentions, in the answer's order; raises LLMOutputError for the repair turn."""
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
            error = validation_message(invalid)
            continue
        out: dict[str, list[Mention]] = {}
        for item in packed.results:
            try:
                out[item.id] = mentions_of(item.entities, f"results.{item.id}.entities")
            except LLMOutputError:
                continue  # nothing usable for this text: left out, so it is asked on its own
        return out
    raise LLMOutputError(error)
