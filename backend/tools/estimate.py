"""`estimate`: the usage figures of `infra/usage.py` computed before anything is sent.

Estimates count tokens with OpenAI's tokenizers (bpe-openai ships their tables, so this works
offline): exact for OpenAI models, a close guess for others (unknown models count as o200k_base).
A completion is counted as the answer a perfect model would give: the gold entities for CoNLL, and
for unlabeled tasks an answer one third the size of the text (about what NER answers run to).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
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
    # an estimate from a sample: the tasks read of the project's, and the figures' relative error (95%)
    read: int | None = None
    of: int | None = None
    error: float | None = None

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
        if self.read is not None and self.of is None:
            lines.append(f"sample          the first {self.read} tasks only: the project's task count is unknown")
        elif self.read is not None:
            lines.append(f"sample          the first {self.read} of {self.of} tasks, extrapolated: "
                         + (f"±{self.error:.1%} (95%)" if self.error is not None else "none of them in scope"))
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


def estimate_sampled(
    tasks: dict[str, NerTask],
    rows: Iterable[dict[str, str] | None],
    total: int | None,
    examples_for: Callable[[str, list[str]], Sequence[FewShotExample]],
    settings: Any,
    pack_size: int = 1,
    limit: int | None = None,
) -> Estimate:
    """An estimate of a project's tasks from the first `settings.estimate_sample` of them, read lazily
    (the first figure comes within seconds and memory stays flat, whatever the project's size).
    `tasks`: the prompt of each target, by key; `rows` yields each task read: its texts by target key
    when the job would send it, None when out of scope; `total` is the project's task count;
    `examples_for(key, the sample's texts)` the few-shot examples of a target. Within the sample (or
    `limit` tasks in scope reached) the figures are exact; beyond, they are scaled to `total` and carry
    their error: the share of tasks in scope and the mean tokens per task, each known to its standard
    error over the sample."""
    sample = settings.estimate_sample
    texts: dict[str, list[tuple[str, None]]] = {key: [] for key in tasks}
    lengths: list[int] = []  # tokens of each task in scope's texts
    read = 0
    limited = False
    for row in itertools.islice(rows, sample):  # never a task (or a page) more than the sample
        read += 1
        if row is None:
            continue
        for key, text in row.items():
            texts[key].append((text, None))
        lengths.append(sum(count_tokens(text, settings.llm_model) for text in row.values()))
        if limit is not None and len(lengths) >= limit:
            limited = True  # every task the job would send is here
            break
    parts = [estimate(task, texts[key], examples_for(key, [t for t, _ in texts[key]]) if texts[key] else [], settings, pack_size)
             for key, task in tasks.items()]
    figures = Estimate(parts[0].model, sum(p.texts for p in parts), sum(p.calls for p in parts),
                       sum(p.prompt_tokens for p in parts), sum(p.completion_tokens for p in parts), parts[0].price)
    if limited or read < sample or (total is not None and total <= read):
        return figures  # every task the job would send was read: exact
    if total is None or not lengths:
        return replace(figures, read=read, of=total)
    # tasks in scope: their share of the sample, times the project's task count
    share = len(lengths) / read
    in_scope = share * total
    capped = limit is not None and in_scope > limit
    scale = (min(float(limit), in_scope) if limit is not None else in_scope) / len(lengths)
    finite = math.sqrt(max(0.0, 1 - read / total))  # what the sample leaves unread
    share_error = 0.0 if capped else math.sqrt((1 - share) / (share * read)) * finite
    # tokens vary with the texts: prompt and answer (a third of them, this module's rule) both grow with them
    mean_tokens = (figures.prompt_tokens + figures.completion_tokens) / len(lengths)
    spread = (statistics.stdev(lengths) if len(lengths) > 1 else 0.0) * 4 / 3
    mean_error = spread / math.sqrt(len(lengths)) / mean_tokens * finite if mean_tokens else 0.0
    return Estimate(
        figures.model, round(figures.texts * scale), round(figures.calls * scale), round(figures.prompt_tokens * scale),
        round(figures.completion_tokens * scale), figures.price, read=read, of=total,
        error=1.96 * math.sqrt(share_error**2 + mean_error**2),
    )


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
    """A Label Studio project's tasks, through the SDK, from a sample of them (`estimate_sampled`); its
    first texts serve as examples."""
    with sdk_errors(f"reading project {project_id}"):
        project = client.projects.get(id=project_id)
        task = _ner_task(project.label_config, settings)
        key = task.target.data_key

        def rows() -> Iterable[dict[str, str] | None]:
            for t in client.tasks.list(project=project_id, fields="all", page_size=min(500, settings.estimate_sample)):
                text = (t.data or {}).get(key)
                yield {key: text} if isinstance(text, str) else None

        def shots(_: str, sample: list[str]) -> list[FewShotExample]:
            return [FewShotExample(text, ()) for text in sample[:examples]]

        return estimate_sampled({key: task}, rows(), getattr(project, "task_number", None), shots, settings, pack_size)
