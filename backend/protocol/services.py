"""What one process builds once and every model object shares: settings, store, templates, LLM."""

from __future__ import annotations

from dataclasses import dataclass

from backend.llm.client import LLMClient
from backend.infra.settings import Settings
from backend.infra.storage import Database
from backend.ner.templates import PromptTemplates, load_templates


@dataclass
class Services:
    settings: Settings
    db: Database
    templates: PromptTemplates
    llm: LLMClient

    @classmethod
    def from_settings(cls, settings: Settings) -> "Services":
        return cls(
            settings=settings,
            db=Database.in_dir(settings.model_dir),
            templates=load_templates(settings.prompts_dir),
            llm=LLMClient(settings),
        )
