"""`estimate`: the usage figures of `infra/usage.py` computed before anything is sent.

Estimates count tokens with OpenAI's tokenizers (bpe-openai ships their tables, so this works
offline): exact for OpenAI models, a close guess for others (unknown models count as o200k_base).
A completion is counted as the answer a perfect model would give: the gold entities for CoNLL, and
for unlabeled tasks an answer one third the size of the text (about what NER answers run to).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from backend.infra.usage import Usage, cost_usd, price_of
from backend.ner.labelconfig import parse_label_config
from backend.ner.mentions import FewShotExample, entities_json
from backend.ner.packing import pack_messages, packed_answer
from backend.ner.task import NerTask
from backend.ner.templates import load_templates
from backend.tools.conll import build_units, labels_of, read_files
from backend.tools.importer import label_config_for, sdk_errors


@lru_cache(maxsize=4)
def _encoding(model: str):
    # imported here: its tables cost ~60 MB of memory, and `llm-ner prelabel --yes` estimates nothing
    import bpe_openai

    try:
        return bpe_openai.encoding_for_model(model)
    except Exception:
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
            completion += sum(a if isinstance(a, int) else count_tokens(entities_json(a), model) for a in answers) + 10 * len(pack)
    for text, gold in alone:
        calls += 1
        prompt += count_message_tokens(task.messages(text, examples), model)
        answer = _expected_answer(text, gold, model)
        completion += answer if isinstance(answer, int) else count_tokens(entities_json(answer), model)
    return Estimate(model, len(usable), calls, prompt, completion, price_of(settings.llm_prices, model))


def _ner_task(label_config: str, settings: Any) -> NerTask:
    return NerTask(parse_label_config(label_config).targets[0], load_templates(settings.prompts_dir, settings.occurrence_hints))


def estimate_conll(
    files: Sequence[str], settings: Any, per: str = "sentence", examples: int = 3, pack_size: int = 1, join: str = "auto"
) -> Estimate:
    """A CoNLL file as tasks (one per sentence or document); its first `examples` units serve as few-shot examples."""
    documents = read_files(files)
    units = build_units(documents, per=per, join=join)
    task = _ner_task(label_config_for(labels_of(documents)), settings)
    shots = [
        FewShotExample(u.text, tuple((e.text, e.label) for e in u.entities), starts=tuple(e.start for e in u.entities))
        for u in units[:examples]
    ]
    texts = [(u.text, [(e.text, e.label) for e in u.entities]) for u in units]
    return estimate(task, texts, shots, settings, pack_size)


def estimate_project(client: Any, project_id: int, settings: Any, examples: int = 3, pack_size: int = 1) -> Estimate:
    """A Label Studio project's tasks, through the SDK; tasks with a ground-truth-like annotation give examples."""
    with sdk_errors(f"reading project {project_id}"):
        project = client.projects.get(id=project_id)
        tasks = list(client.tasks.list(project=project_id, fields="all"))
    task = _ner_task(project.label_config, settings)
    key = task.target.data_key
    texts = [(t.data.get(key), None) for t in tasks if isinstance((t.data or {}).get(key), str)]
    shots = [FewShotExample(text, ()) for text, _ in texts[:examples]]
    return estimate(task, texts, shots, settings, pack_size)
