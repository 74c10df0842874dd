"""Prompt templates as editable files in `prompts/`, rendered with a sandboxed Jinja2.

User text only ever enters as a variable, so braces or `{{ }}` in a task cannot break rendering
(the `str.format` trap of upstream backends) and cannot run template code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
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
    # hints change the prompt and the answer's schema, so they are part of the fingerprint (and so of
    # the model_version); without them the fingerprint is what it always was
    parts = [sources[n] for n in TEMPLATE_NAMES] + (["hints"] if hints else [])
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:16]
    return PromptTemplates(sources=sources, fingerprint=digest, hints=hints)
