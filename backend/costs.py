"""Usage and cost: tokens per call from the API's `usage`, totals per project, an optional price
table (LLM_PRICES) for cost, and `estimate`: the same figures computed before anything is sent.

Estimates count tokens with OpenAI's tokenizers (bpe-openai ships their tables, so this works
offline): exact for OpenAI models, a close guess for others (unknown models count as o200k_base).
A completion is counted as the answer a perfect model would give: the gold entities for CoNLL, and
for unlabeled tasks an answer one third the size of the text (about what NER answers run to).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from backend import metrics
from backend.examples import FewShotExample
from backend.llm import Usage
from backend.storage import Database
from backend.task import NerTask, answer_json

log = logging.getLogger(__name__)

USAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_usage (
    project_id TEXT PRIMARY KEY,
    tasks INTEGER NOT NULL DEFAULT 0,
    calls INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0
);
"""
PER_MILLION = 1_000_000


def price_of(prices: dict[str, tuple[float, float]] | None, model: str) -> tuple[float, float] | None:
    """USD per 1M (prompt, completion) tokens: an exact entry, else the longest entry the model name starts with."""
    if not prices:
        return None
    if model in prices:
        return prices[model]
    matches = [name for name in prices if model.startswith(name)]
    return prices[max(matches, key=len)] if matches else None


def cost_usd(usage: Usage, price: tuple[float, float] | None) -> float | None:
    if price is None:
        return None
    return (usage.prompt_tokens * price[0] + usage.completion_tokens * price[1]) / PER_MILLION


class UsageLedger:
    def __init__(self, db: Database):
        self.db = db

    @classmethod
    def in_dir(cls, model_dir: Path) -> "UsageLedger":
        return _open(str(Path(model_dir).resolve()))

    def add(self, project_id: str, usage: Usage, tasks: int, cost: float | None) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO llm_usage(project_id, tasks, calls, prompt_tokens, completion_tokens, cost_usd) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(project_id) DO UPDATE SET tasks=tasks+excluded.tasks, "
                "calls=calls+excluded.calls, prompt_tokens=prompt_tokens+excluded.prompt_tokens, "
                "completion_tokens=completion_tokens+excluded.completion_tokens, cost_usd=cost_usd+excluded.cost_usd",
                (project_id, tasks, usage.calls, usage.prompt_tokens, usage.completion_tokens, cost or 0.0),
            )

    def totals(self, project_id: str) -> dict[str, Any]:
        rows = self.db.query("SELECT * FROM llm_usage WHERE project_id=?", (project_id,))
        if not rows:
            return {"project_id": project_id, "tasks": 0, "calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
        return dict(rows[0])


@lru_cache(maxsize=8)
def _open(model_dir: str) -> UsageLedger:
    return UsageLedger(Database.in_dir(Path(model_dir), extra_schema=(USAGE_SCHEMA,)))


def account(project_id: str, usages: Sequence[Usage | None], settings: Any) -> None:
    """Add one /predict's usage to the project's totals, /metrics and the log (with cost per task)."""
    total = Usage()
    for usage in usages:
        if usage is not None:
            total.add(usage)
    cost = cost_usd(total, price_of(settings.llm_prices, settings.llm_model))
    UsageLedger.in_dir(settings.model_dir).add(project_id, total, len(usages), cost)
    metrics.PROJECT_TOKENS.labels(project_id, "prompt").inc(total.prompt_tokens)
    metrics.PROJECT_TOKENS.labels(project_id, "completion").inc(total.completion_tokens)
    if cost is not None:
        metrics.PROJECT_COST.labels(project_id).inc(cost)
    per_task = f", ${cost:.6f} (${cost / max(1, len(usages)):.6f} per task)" if cost is not None else ""
    log.info(
        "project %s: %d tasks, %d LLM calls, %d prompt + %d completion tokens%s",
        project_id, len(usages), total.calls, total.prompt_tokens, total.completion_tokens, per_task,
    )


# ---- estimate: the figures before anything is sent ----
@lru_cache(maxsize=4)
def _encoding(model: str):
    import bpe_openai

    try:
        return bpe_openai.encoding_for_model(model)
    except Exception:  # noqa: BLE001 - an unknown (non-OpenAI) model: count with the newest table
        return bpe_openai.get_encoding("o200k_base")


@lru_cache(maxsize=4096)  # the system prompt and examples recur in every message list
def count_tokens(text: str, model: str) -> int:
    return len(_encoding(model).encode(text))


def count_message_tokens(messages: Sequence[dict[str, str]], model: str) -> int:
    """Chat framing as OpenAI counts it: ~3 tokens per message, 3 to prime the reply."""
    return sum(3 + count_tokens(m.get("content") or "", model) for m in messages) + 3


@dataclass
class Estimate:
    model: str
    texts: int
    calls: int
    prompt_tokens: int
    completion_tokens: int
    price: tuple[float, float] | None

    @property
    def cost_usd(self) -> float | None:
        return cost_usd(Usage(self.prompt_tokens, self.completion_tokens, self.calls), self.price)

    def describe(self) -> str:
        per = max(1, self.texts)
        lines = [
            f"model           {self.model}",
            f"texts           {self.texts}",
            f"LLM calls       {self.calls}",
            f"prompt tokens   {self.prompt_tokens} ({self.prompt_tokens / per:.1f} per text)",
            f"answer tokens   {self.completion_tokens} ({self.completion_tokens / per:.1f} per text)",
        ]
        cost = self.cost_usd
        if cost is None:
            lines.append("cost            unknown: no LLM_PRICES entry for this model")
        else:
            lines.append(f"cost            ${cost:.4f} (${cost / per:.6f} per text)")
        return "\n".join(lines)


def _expected_answer(text: str, gold: Sequence[tuple[str, str]] | None, model: str) -> list[tuple[str, str]] | int:
    if gold is not None:
        return list(gold)
    return count_tokens(text, model) // 3


def estimate(
    task: NerTask,
    texts: Sequence[tuple[str, Sequence[tuple[str, str]] | None]],
    examples: Sequence[FewShotExample],
    settings: Any,
    pack_size: int = 1,
) -> Estimate:
    """LLM calls and tokens for these (text, gold entities or None), as the backend would send them."""
    from backend.packing import pack_messages, packed_answer

    model = settings.llm_model
    usable = [(t, g) for t, g in texts if t.strip()]
    prompt = completion = calls = 0
    short = [(t, g) for t, g in usable if pack_size > 1 and len(t) <= settings.pack_max_chars]
    alone = [(t, g) for t, g in usable if not (pack_size > 1 and len(t) <= settings.pack_max_chars)]
    for i in range(0, len(short), pack_size):
        pack = short[i : i + pack_size]
        if len(pack) == 1:
            alone.append(pack[0])
            continue
        calls += 1
        prompt += count_message_tokens(pack_messages(task, [t for t, _ in pack], examples), model)
        answers = [_expected_answer(t, g, model) for t, g in pack]
        if all(isinstance(a, list) for a in answers):
            completion += count_tokens(packed_answer(answers), model)  # type: ignore[arg-type]
        else:
            completion += sum(a if isinstance(a, int) else count_tokens(answer_json(a), model) for a in answers) + 10 * len(pack)
    for text, gold in alone:
        calls += 1
        prompt += count_message_tokens(task.messages(text, examples), model)
        answer = _expected_answer(text, gold, model)
        completion += answer if isinstance(answer, int) else count_tokens(answer_json(answer), model)
    return Estimate(model, len(usable), calls, prompt, completion, price_of(settings.llm_prices, model))


def _ner_task(label_config: str, settings: Any) -> NerTask:
    from backend.labelconfig import parse_label_config
    from backend.templates import load_templates

    return NerTask(parse_label_config(label_config).targets[0], load_templates(settings.prompts_dir))


def estimate_conll(files: Sequence[str], settings: Any, per: str = "sentence", examples: int = 3, pack_size: int = 1) -> Estimate:
    """A CoNLL file as tasks (one per sentence or document); its first `examples` units serve as few-shot examples."""
    from backend.conll import build_units, labels_of, read_files
    from backend.importer import label_config_for

    documents = read_files(files)
    units = build_units(documents, per=per)
    task = _ner_task(label_config_for(labels_of(documents)), settings)
    shots = [FewShotExample(u.text, tuple((e.text, e.label) for e in u.entities)) for u in units[:examples]]
    texts = [(u.text, [(e.text, e.label) for e in u.entities]) for u in units]
    return estimate(task, texts, shots, settings, pack_size)


def estimate_project(client: Any, project_id: int, settings: Any, examples: int = 3, pack_size: int = 1) -> Estimate:
    """A Label Studio project's tasks, through the SDK; tasks with a ground-truth-like annotation give examples."""
    from backend.importer import sdk_errors

    with sdk_errors(f"reading project {project_id}"):
        project = client.projects.get(id=project_id)
        tasks = list(client.tasks.list(project=project_id, fields="all"))
    task = _ner_task(project.label_config, settings)
    key = task.target.data_key
    texts = [(t.data.get(key), None) for t in tasks if isinstance((t.data or {}).get(key), str)]
    shots = [FewShotExample(text, ()) for text, _ in texts[:examples]]
    return estimate(task, texts, shots, settings, pack_size)
