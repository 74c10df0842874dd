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

from jinja2 import StrictUndefined, TemplateSyntaxError
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

    def render(self, name: str, **variables: object) -> str:
        return render_source(self.sources[name], **variables)


def render_source(source: str, **variables: object) -> str:
    return _compiled(source).render(**variables).strip()


@lru_cache(maxsize=64)
def _compiled(source: str):
    # compiling costs more than rendering, and a prompt renders a template once per example: compile each source once
    return _environment().from_string(source)


@lru_cache(maxsize=1)
def _environment() -> SandboxedEnvironment:
    # autoescape off: prompts are plain text, not HTML
    return SandboxedEnvironment(undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False)


def load_templates(directory: Path, hints: bool = False) -> PromptTemplates:
    """Read and compile every template; a missing file or a syntax error names the file."""
    sources: dict[str, str] = {}
    for name in TEMPLATE_NAMES:
        path = Path(directory) / f"{name}.j2"
        try:
            sources[name] = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"PROMPTS_DIR: cannot read {path} ({error.strerror})") from None
        try:
            _environment().parse(sources[name])
        except TemplateSyntaxError as error:
            raise ConfigError(f"PROMPTS_DIR: {path}:{error.lineno}: {error.message}") from None
    example, example_source = read_example(Path(directory) / "example.json")
    # hints change the prompt and the answer's schema, so they are part of the fingerprint (and so of
    # the model_version); without them the fingerprint is what it always was
    parts = [sources[n] for n in TEMPLATE_NAMES] + (["hints"] if hints else []) + ([example_source] if example_source else [])
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:16]
    return PromptTemplates(sources=sources, fingerprint=digest, hints=hints, example=example)


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
