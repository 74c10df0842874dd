"""The NER task: builds the prompt for one text and parses the LLM's answer into entities.

It knows nothing of HTTP or providers (that is `llm/`) nor of offsets (that is `spans/`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from backend.infra.errors import LLMOutputError, validation_message
from backend.ner.constraints import EntitySchema, TextLimits, constrained_schema
from backend.ner.labelconfig import NerTarget
from backend.ner.mentions import FewShotExample, Listing, Mention, entities_json
from backend.ner.templates import PromptTemplates


class ListedMention(BaseModel):
    """One entity as the LLM writes it. Further keys (a reason, a confidence...) are allowed and ignored."""

    model_config = ConfigDict(extra="allow")

    text: str = Field(min_length=1)
    label: str = Field(min_length=1)
    # occurrence hint: a little of the text around this mention (see alignment.py); optional
    context: str | None = None

    @field_validator("context", mode="before")
    @classmethod
    def _context_is_only_a_hint(cls, value: Any) -> Any:
        # a malformed hint is no reason to ask the model again: it is simply not used
        return value if isinstance(value, str) else None


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")

    # each entity is checked on its own (`mentions_of`): one bad entity is dropped, not the answer
    entities: list[Any]


def mentions_of(items: Sequence[Any], where: str = "entities") -> list[Mention]:
    """The listed entities as mentions. One that is not a {"text", "label"} pair of strings (empty text,
    a null label, a number) becomes a mention that alignment drops and counts (empty text: `empty`;
    no label: `unknown_label`), so it costs that entity alone. Raises LLMOutputError (for the repair
    turn) only when entities were listed and none of them is usable."""
    mentions = []
    contexts: list[str | None] = []  # occurrence hints (see alignment.py), when the answer gives them
    first_error = None
    for i, item in enumerate(items):
        context = item.get("context") if isinstance(item, dict) else None
        contexts.append(context if isinstance(context, str) else None)  # a malformed hint is simply not used
        if isinstance(item, dict) and isinstance(item.get("text"), str) and isinstance(item.get("label"), str):
            mentions.append(Mention(item["text"], item["label"]))
            if item["text"].strip() and item["label"]:
                continue
        else:
            text, label = (item.get("text"), item.get("label")) if isinstance(item, dict) else (None, None)
            mentions.append(Mention(text if isinstance(text, str) else "", label if isinstance(label, str) else ""))
        if first_error is None:
            try:
                ListedMention.model_validate(item)
            except ValidationError as error:
                first_error = validation_message(error, f"{where}.{i}")
            else:
                first_error = f"{where}.{i}.text: empty"
    if items and all(not m.text.strip() or not m.label for m in mentions):
        raise LLMOutputError(first_error or f"{where}: no usable entity")
    return Listing(mentions, contexts) if any(contexts) else mentions


def occurrence_context(text: str, start: int, end: int, width: int = 2, most: int = 8) -> str:
    """The mention text[start:end] with `width` characters on each side, widened up to `most` until it
    occurs once in the text: an occurrence hint as the prompts ask for it (spans/alignment.py reads it)."""
    for size in range(width, most + 1):
        context = text[max(0, start - size) : end + size]
        first = text.find(context)
        if text.find(context, first + 1) == -1:
            break
    return context


def needs_hint(text: str, surface: str) -> bool:
    """The entities the prompt asks a context for: one or two characters long, or repeated in the text."""
    return len(surface) <= 2 or text.count(surface) > 1


@lru_cache(maxsize=256)
def hinted_answer_json(text: str, entities: tuple[tuple[str, str], ...], starts: tuple[int, ...]) -> str:
    """A perfect answer with occurrence hints, as the hinting prompts ask for it (`context` or null)."""
    items = []
    for (surface, label), start in zip(entities, starts, strict=True):
        hint = occurrence_context(text, start, start + len(surface)) if needs_hint(text, surface) else None
        items.append({"text": surface, "label": label, "context": hint})
    return json.dumps({"entities": items}, ensure_ascii=False)


MAX_NEGATIVES = 10


class NerTask:
    def __init__(self, target: NerTarget, templates: PromptTemplates, guidelines: str | None = None):
        self.target = target
        self.templates = templates
        self.guidelines = guidelines or ""
        self._json_schema: dict[str, Any] | None = None
        self._system_prompts: dict[tuple[tuple[str, str], ...], str] = {}
        self.example = self.worked_example()

    def worked_example(self) -> dict[str, str] | None:
        """The answer format shown by example rather than with placeholders (small models copy
        `"<exact text>"` into their answers): the templates' example.json with the entities whose
        label goes by a name of this project (case aside); None when none does."""
        example = self.templates.example
        if not example:
            return None
        names = {name.casefold(): name for name in self.target.label_names}
        entities, starts, cursor = [], [], 0
        for entity in example["entities"]:
            label = next((names[n.casefold()] for n in entity["labels"] if isinstance(n, str) and n.casefold() in names), None)
            start = example["text"].find(entity["text"], cursor)
            if label is None or start == -1:
                continue
            entities.append((entity["text"], label))
            starts.append(start)
            cursor = start + len(entity["text"])
        if not entities:
            return None
        text = example["text"]
        answer = hinted_answer_json(text, tuple(entities), tuple(starts)) if self.templates.hints else entities_json(entities)
        # the list alone, for the packed form's example (pack.j2)
        return {"text": text, "answer": answer, "entities": json.dumps(json.loads(answer)["entities"], ensure_ascii=False)}

    # ---- prompt ----
    def system_prompt(self, examples: Sequence[FewShotExample] = ()) -> str:
        # what annotators deleted from the LLM's drafts of the examples shown: the mistakes not to repeat
        negatives = tuple(dict.fromkeys(n for e in examples for n in e.rejected))[:MAX_NEGATIVES]
        # labels and guidelines are fixed for the task: the prompt varies with the negatives only,
        # and the same few examples (so the same negatives) come back task after task
        prompt = self._system_prompts.get(negatives)
        if prompt is None:
            if len(self._system_prompts) >= 64:
                self._system_prompts.clear()
            prompt = self._system_prompts[negatives] = self.templates.render(
                "system", labels=self.target.labels, guidelines=self.guidelines, negatives=list(negatives),
                hints=self.templates.hints, example=self.example,
            )
        return prompt

    def user_prompt(self, text: str) -> str:
        return self.templates.render("user", text=text)

    def example_prompt(self, text: str) -> str:
        """The user turn of a few-shot example: the same few are shown task after task, render each once."""
        return self.templates.example_prompt(text)

    def messages(self, text: str, examples: Sequence[FewShotExample] = ()) -> list[dict[str, str]]:
        """System prompt, then each example as a user/assistant exchange, then the text to label."""
        messages = [{"role": "system", "content": self.system_prompt(examples)}]
        for example in examples:
            messages.append({"role": "user", "content": self.example_prompt(example.text)})
            messages.append({"role": "assistant", "content": self.example_answer(example)})
        messages.append({"role": "user", "content": self.user_prompt(text)})
        return messages

    def example_answer(self, example: FewShotExample) -> str:
        """The assistant turn of a few-shot example: its entities, with hints when the prompt asks for them."""
        if self.templates.hints and len(example.starts) == len(example.entities):
            return hinted_answer_json(example.text, tuple(example.entities), tuple(example.starts))
        return entities_json(example.entities)

    def repair_prompt(self, error: str) -> str:
        return self.templates.render("repair", error=error, hints=self.templates.hints)

    def json_schema(self) -> dict[str, Any]:
        """For `response_format={"type": "json_schema"}`: labels as an enum, strict shape (built once:
        every call and every cache key of the task uses it; callers must not change it)."""
        if self._json_schema is None:
            self._json_schema = self._build_json_schema()
        return self._json_schema

    def _build_json_schema(self) -> dict[str, Any]:
        return entities_schema(self.target.label_names, hints=self.templates.hints)

    def schema_for(self, text: str, limits: TextLimits | None, names: bool = True) -> EntitySchema:
        """The answer's schema for this text: entity texts constrained to its spans (`names`: those that
        look like names) where the endpoint constrains decoding (`limits`, see ner/constraints.py), else
        `json_schema()`."""
        return constrained_schema(self.json_schema(), text, limits, names)

    # ---- answer ----
    def parse(self, content: str | None) -> list[Mention]:
        return parse_answer(content)


def entities_schema(labels: Sequence[str], hints: bool = False) -> dict[str, Any]:
    """The strict JSON schema of an answer listing entities of these labels (what `json_schema`
    structured output asks for; the capability probe sends the same shape)."""
    properties: dict[str, Any] = {
        "text": {"type": "string"},
        "label": {"type": "string", "enum": list(labels)},
    }
    if hints:
        # strict schemas list every property as required: "no hint" is null
        properties["context"] = {"type": ["string", "null"]}
    return {
        "name": "entities",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "entities": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": properties,
                        "required": list(properties),
                        "additionalProperties": False,
                    },
                }
            },
            "required": ["entities"],
            "additionalProperties": False,
        },
    }


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def _json_candidates(content: str):
    """Yield JSON values found in the answer: the whole of it, fenced blocks, then embedded objects."""
    stripped = content.strip()
    yield stripped
    for block in _FENCE.findall(content):
        yield block.strip()
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", content):
        try:
            value, _ = decoder.raw_decode(content, match.start())
        except ValueError:
            continue
        # a list inside prose counts only as a top-level list, not as a value inside an object
        if isinstance(value, dict) or content[: match.start()].count("{") == 0:
            yield value


def parse_answer(content: str | None) -> list[Mention]:
    """Tolerant parsing: plain JSON, code fences, prose around the JSON, or a bare list of entities.

    Raises LLMOutputError with a message meant for the model's repair turn.
    """
    if content is None or not content.strip():
        raise LLMOutputError("the answer was empty")
    if content.lstrip().startswith("{"):
        # the usual answer (structured output): parsed and validated in one pass, in pydantic's Rust
        try:
            return _mentions(_Answer.model_validate_json(content))
        except (ValidationError, LLMOutputError):
            pass  # prose around it, a bare list, a bad field: the tolerant path below tells which
    last_error = "no JSON object was found in the answer"
    validation_error = None  # the most useful message for the repair turn, when there is one
    for candidate in _json_candidates(content):
        if isinstance(candidate, str):
            try:
                candidate = json.loads(candidate)
            except ValueError:
                continue
        if isinstance(candidate, list):
            candidate = {"entities": candidate}
        if not isinstance(candidate, dict) or "entities" not in candidate:
            last_error = 'the JSON has no "entities" list'
            continue

        try:
            return _mentions(_Answer.model_validate(candidate))
        except ValidationError as error:
            validation_error = validation_error or validation_message(error)
        except LLMOutputError as error:
            validation_error = validation_error or str(error)
    raise LLMOutputError(validation_error or last_error)


def _mentions(answer: _Answer) -> list[Mention]:
    return mentions_of(answer.entities)
