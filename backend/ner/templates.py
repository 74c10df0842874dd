"""Prompt templates as editable files in `prompts/`, rendered with a sandboxed Jinja2.

User text only ever enters as a variable, so braces or `{{ }}` in a task cannot break rendering
(the `str.format` trap of upstream backends) and cannot run template code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from jinja2 import StrictUndefined, Template, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment

from backend.infra.errors import ConfigError

TEMPLATE_NAMES = ("system", "user", "repair", "marks", "pack", "pack_repair")


@dataclass(frozen=True)
class PromptTemplates:
    sources: dict[str, str]
    fingerprint: str
    # ask for occurrence hints (a `context` per short or repeated entity): the templates get `hints`
    hints: bool = False
    # `example.json`: a worked example of the answer, its entities with the label names they may
    # go by; the prompt shows it with the project's own labels (NerTask.worked_example)
    example: dict = field(default_factory=dict)
    # each source compiled once, at load (compiling costs more than rendering, and a prompt renders a
    # template once per example): state of this object, which Services holds, not of the module
    compiled: dict[str, Template] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # a few selected examples recur task after task: each one's user turn rendered once (task texts
        # themselves are never cached)
        object.__setattr__(self, "_examples", lru_cache(maxsize=256)(lambda text: self.render("user", text=text)))

    def render(self, name: str, **variables: object) -> str:
        return self.compiled[name].render(**variables).strip()

    def example_prompt(self, text: str) -> str:
        """The user turn of a few-shot example."""
        return self._examples(text)  # type: ignore[attr-defined]


def load_templates(directory: Path, hints: bool = False) -> PromptTemplates:
    """Read and compile every template; a missing file or a syntax error names the file."""
    # autoescape off: prompts are plain text, not HTML
    environment = SandboxedEnvironment(undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    sources: dict[str, str] = {}
    compiled: dict[str, Template] = {}
    for name in TEMPLATE_NAMES:
        path = Path(directory) / f"{name}.j2"
        try:
            sources[name] = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"PROMPTS_DIR: cannot read {path} ({error.strerror})") from None
        try:
            compiled[name] = environment.from_string(sources[name])
        except TemplateSyntaxError as error:
            raise ConfigError(f"PROMPTS_DIR: {path}:{error.lineno}: {error.message}") from None
    example, example_source = read_example(Path(directory) / "example.json")
    # hints change the prompt and the answer's schema, so they are part of the fingerprint (and so of
    # the model_version); without them the fingerprint is what it always was
    parts = [sources[n] for n in TEMPLATE_NAMES] + (["hints"] if hints else []) + ([example_source] if example_source else [])
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:16]
    return PromptTemplates(sources=sources, fingerprint=digest, hints=hints, example=example, compiled=compiled)


def read_example(path: Path) -> tuple[dict, str]:
    """The worked example (optional: a PROMPTS_DIR without one shows none) and its source text.
    {"text": "...", "entities": [{"text": a span of it, "labels": [label names it may go by]}]}"""
    if not path.exists():
        return {}, ""
    try:
        source = path.read_text(encoding="utf-8")
        example = json.loads(source)
    except (OSError, ValueError) as error:
        raise ConfigError(f"PROMPTS_DIR: cannot read {path} ({error})") from None
    entities = example.get("entities") if isinstance(example, dict) else None
    if not isinstance(example.get("text"), str) or not isinstance(entities, list) or not all(
        isinstance(e, dict) and isinstance(e.get("text"), str) and e["text"] in example["text"]
        and isinstance(e.get("labels"), list) for e in entities
    ):
        raise ConfigError(f'PROMPTS_DIR: {path}: expected {{"text": ..., "entities": [{{"text": a span of the text, "labels": [...]}}]}}')
    return example, source
