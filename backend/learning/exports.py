"""Stored corrections as training data for tuning LLMs: chat SFT and preference (DPO/reward) JSONL.

- `sft`: one line per example, OpenAI's chat fine-tuning format:
  `{"messages": [system, user, {"role": "assistant", "content": <corrected entities JSON>}]}`.
- `preferences`: one line per example whose recorded LLM draft differs from the human's correction,
  in the conversational preference format of Hugging Face TRL (DPOTrainer, RewardTrainer):
  `{"prompt": [system, user], "chosen": [assistant: corrected], "rejected": [assistant: draft]}`.

The prompts are the ones the backend sends (same templates), so a model tuned on them is asked the
same way it was taught.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backend.infra.errors import BackendError
from backend.infra.storage import Database
from backend.learning.store import ExampleStore, StoredExample
from backend.ner.labelconfig import NerSchema, parse_label_config
from backend.ner.mentions import entities_json
from backend.ner.task import NerTask
from backend.ner.templates import PromptTemplates, load_templates

KINDS = ("sft", "preferences")


def _entities(spans) -> list[tuple[str, str]]:
    return [(s.text, s.label) for s in sorted(spans)]


def _prompt(task: NerTask, example: StoredExample) -> list[dict[str, str]]:
    return task.messages(example.text)


def sft_records(schema: NerSchema, templates: PromptTemplates, examples: list[StoredExample]) -> Iterator[dict[str, Any]]:
    tasks = {t.key: NerTask(t, templates) for t in schema.targets}
    for example in sorted(examples, key=lambda e: (e.task_id, e.from_name)):
        task = tasks.get(example.from_name)
        if task is None:  # a target the current label config no longer has
            continue
        answer = {"role": "assistant", "content": entities_json(_entities(example.spans))}
        yield {"messages": [*_prompt(task, example), answer]}


def preference_records(schema: NerSchema, templates: PromptTemplates, examples: list[StoredExample]) -> Iterator[dict[str, Any]]:
    tasks = {t.key: NerTask(t, templates) for t in schema.targets}
    for example in sorted(examples, key=lambda e: (e.task_id, e.from_name)):
        task = tasks.get(example.from_name)
        if task is None or example.draft is None:
            continue
        chosen, rejected = _entities(example.spans), _entities(example.draft)
        if [(s.start, s.end, s.label) for s in sorted(example.spans)] == [(s.start, s.end, s.label) for s in sorted(example.draft)]:
            continue  # the human accepted the draft: no preference to learn
        yield {
            "prompt": _prompt(task, example),
            "chosen": [{"role": "assistant", "content": entities_json(chosen)}],
            "rejected": [{"role": "assistant", "content": entities_json(rejected)}],
        }


def export(
    kind: str, project_id: str, out: Path, model_dir: Path, prompts_dir: Path, hints: bool = False,
    database_url: str | None = None,
) -> int:
    """Write the project's examples as JSONL to `out` (replaced whole, never half-written); returns the line count.
    The store is PostgreSQL at `database_url` when given, else the SQLite file under `model_dir`."""
    if kind not in KINDS:
        raise BackendError(f"unknown export '{kind}': use one of {', '.join(KINDS)}")
    db_path = Path(model_dir) / "backend.sqlite3"
    if not database_url and not db_path.exists():
        raise BackendError(f"no store at {db_path}: set MODEL_DIR to the backend's data directory")
    db = Database.open(model_dir, database_url)  # an unreachable PostgreSQL raises StoreUnavailable, naming it
    label_config = db.label_config(str(project_id))
    if not label_config:
        raise BackendError(f"project {project_id} is unknown in {db.where}: connect the backend to it in Label Studio first")
    schema = parse_label_config(label_config)
    templates = load_templates(prompts_dir, hints)
    examples = ExampleStore(db, str(project_id)).examples()
    records = sft_records if kind == "sft" else preference_records
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for record in records(schema, templates, examples):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def export_with_settings(kind: str, project_id: str, out: Path) -> int:
    """`llm-ner export`: MODEL_DIR and PROMPTS_DIR from the settings; no LLM key is needed to export."""
    from backend.infra.settings import load_settings

    settings = load_settings(**({} if os.environ.get("OPENAI_API_KEY") else {"openai_api_key": "not-needed-for-export"}))
    url = settings.database_url.get_secret_value() if settings.database_url is not None else None
    return export(kind, project_id, out, settings.model_dir, settings.prompts_dir, settings.occurrence_hints, url)
