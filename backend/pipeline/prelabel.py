"""Pre-labeling one task: prompt → LLM → entities → exact spans → Label Studio results."""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.infra import metrics
from backend.infra.deadline import DeadlineExceeded, Outcome, map_in_order, time_left
from backend.infra.errors import BadRequest, LLMError
from backend.infra.logs import about
from backend.infra.settings import Settings
from backend.infra.usage import Usage
from backend.llm.cache import ResponseCache
from backend.llm.client import CHARS_PER_TOKEN, ContextTooLong, LLMCallFailed, LLMClient, prompt_chars, text_chars_for
from backend.llm.source import EntitySource, Found, TextRequest
from backend.ner import confidence
from backend.ner.labelconfig import NerSchema, NerTarget
from backend.ner.mentions import FewShotExample
from backend.ner.task import NerTask
from backend.ner.templates import PromptTemplates
from backend.spans.alignment import Alignment, Span, align, normalise
from backend.spans.chunking import align_chunks, split

log = logging.getLogger(__name__)

# (target, text) -> the few-shot examples to show for it
ExampleSelector = Callable[[NerTarget, str], Sequence[FewShotExample]]


@dataclass
class TaskOutcome:
    results: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    usage: Usage = field(default_factory=Usage)
    score: float | None = None  # the task's confidence (confidence.task_score)


def score_lookup(scores: dict[tuple[str, str], float]) -> Callable[[Span], float | None]:
    """A span's score: the LLM scored (surface, label) as it wrote the surface, while a span matched
    ignoring case or normalisation carries the text's own spelling, so a miss is looked up again by
    the folded form (the one alignment matched on)."""
    folded: dict[tuple[str, str], float] | None = None

    def lookup(span: Span) -> float | None:
        nonlocal folded
        score = scores.get((span.text, span.label))
        if score is None and scores:
            if folded is None:
                folded = {}
                for (text, label), value in scores.items():
                    key = (normalise(text), label)
                    folded[key] = min(value, folded.get(key, value))
            score = folded.get((normalise(span.text), span.label))
        return score

    return lookup


def span_results(target: NerTarget, spans: Sequence[Span], scores: dict[tuple[str, str], float] | None = None) -> list[dict[str, Any]]:
    """Label Studio regions in the shape of `wire.SpanResult`, built as plain dicts: this runs for
    every span of every task, and validating values we built ourselves would only cost time
    (tests validate the output against `SpanResult`)."""
    score_of = score_lookup(scores or {})
    prefix = secrets.token_hex(4)  # region ids need only be unique within one prediction
    results = []
    for i, s in enumerate(spans):
        region: dict[str, Any] = {
            "id": f"{prefix}{i}",
            "from_name": target.from_name,
            "to_name": target.to_name,
            "type": "labels",
            "value": {"start": s.start, "end": s.end, "text": s.text, "labels": [s.label]},
        }
        score = score_of(s)
        if score is not None:
            region["score"] = score
        results.append(region)
    return results


def unanswered_reason(error: BaseException) -> str:
    """Why a task got no pre-labels, as a /metrics label: the deadline, the LLM (by error class), the
    task's data, or an unexpected error."""
    if isinstance(error, DeadlineExceeded):
        return "deadline"
    error_class = getattr(error, "error_class", None)  # the LLM client's classification of a failed call
    if error_class:
        return f"llm_{error_class}"
    if isinstance(error, LLMError):
        return "llm_output"
    if isinstance(error, BadRequest):
        return "bad_task"
    return "error"


def _no_fit(error: ContextTooLong, size: int) -> LLMCallFailed:
    window = f"of {error.window} tokens" if error.window else ""
    return LLMCallFailed(
        f"the prompt does not fit in the LLM endpoint's context window {window} even with {size}-character chunks of"
        " the text: start the server with a larger context (llama-cpp-python: --n_ctx 8192; llama.cpp: -c 8192)"
        f" or lower FEW_SHOT_TOKEN_BUDGET ({error})",
        "context_length",
    )


def task_text(data: dict[str, Any], target: NerTarget) -> str:
    if target.data_key not in data:
        raise BadRequest(f"task data has no '{target.data_key}' key (the <Text> value ${target.data_key})")
    value = data[target.data_key]
    if not isinstance(value, str):
        raise BadRequest(f"task data '{target.data_key}' must be a string, not {type(value).__name__}")
    return value


# chunks are sized to the endpoint's context window when it is known (client.text_chars_for)
MIN_CHUNK_CHARS = 200  # below, the instructions and examples alone fill the window
RESPLITS = 3  # a text a 400 said was too long is split again at most this many times


class Prelabeler:
    def __init__(
        self,
        schema: NerSchema,
        templates: PromptTemplates,
        llm: LLMClient,
        select_examples: ExampleSelector | None = None,
        guidelines: str | None = None,
        label_all_mentions: bool = True,
        source: EntitySource | None = None,
        context_chars: int = 12_000,
        chunk_overlap: int = 300,
    ):
        self.schema = schema
        self.llm = llm
        self.source = source or EntitySource(llm)  # the response cache and scoring live there
        self.select_examples = select_examples or (lambda target, text: ())
        self.label_all_mentions = label_all_mentions
        self.context_chars = context_chars
        self.chunk_overlap = chunk_overlap
        self.tasks = {t.key: NerTask(t, templates, guidelines) for t in schema.targets}

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        schema: NerSchema,
        templates: PromptTemplates,
        llm: LLMClient,
        cache: ResponseCache | None = None,
        scope: str = "",
        select_examples: ExampleSelector | None = None,
        guidelines: str | None = None,
        source: EntitySource | None = None,
    ) -> Prelabeler:
        """The pre-labeler the settings describe: what /predict, warm start and the command-line tools use
        (`source`: one built from these settings with more to it, such as the evaluation's timing)."""
        return cls(
            schema, templates, llm,
            select_examples=select_examples,
            guidelines=guidelines,
            label_all_mentions=settings.label_all_mentions,
            context_chars=settings.llm_context_chars,
            chunk_overlap=settings.llm_chunk_overlap,
            source=source or EntitySource.from_settings(settings, llm, cache, scope),
        )

    def prelabel_many(
        self, tasks: Sequence[dict[str, Any]], *, concurrency: int, deadline_seconds: float, pack_size: int = 1,
        pack_max_chars: int = 1000,
        keep_late: Callable[[int], Callable[[Outcome[TaskOutcome]], None] | None] | None = None,
    ) -> list[Outcome[TaskOutcome]]:
        """Every task's pre-labels under one deadline: one outcome per task, in task order, each a
        TaskOutcome or the error that replaced it (DeadlineExceeded for what did not finish).
        `keep_late`: see `map_in_order` (tasks the deadline cuts may run on in the background)."""
        deadline = time.monotonic() + deadline_seconds
        if pack_size > 1:  # short texts several to a call; each task below finds its answer
            self.prefill(tasks, pack_size, pack_max_chars, concurrency, deadline)
        outcomes = map_in_order(
            lambda task: self.prelabel(task.get("data") or {}, task.get("id")),
            tasks,
            concurrency=concurrency,
            deadline_seconds=deadline - time.monotonic(),
            keep_late=keep_late,
        )
        self.flush()  # this request's answers, for every worker's next request
        return outcomes

    def flush(self) -> None:
        """Write the answers this pre-labeler was given into the shared response cache, where every
        worker and process finds them (its callers flush; none reaches into its source or cache)."""
        self.source.flush()

    def prefill(self, tasks: Sequence[dict[str, Any]], pack_size: int, max_chars: int, concurrency: int, deadline: float) -> int:
        """Answer the short, uncached texts of these tasks `pack_size` to an LLM call, ahead of the
        per-task pass, which then finds them answered (PACK_SIZE > 1; see ner/packing.py)."""
        # a text long enough to be chunked is asked chunk by chunk, under other keys: never pack it
        longest = {target.key: min(max_chars, self.chunk_chars(target)) for target in self.schema.targets}
        requests = []
        for task in tasks:
            data = task.get("data") or {}
            for target in self.schema.targets:
                text = data.get(target.data_key)
                if isinstance(text, str) and text.strip() and len(text) <= longest[target.key]:
                    requests.append(TextRequest(self.tasks[target.key], text, self.select_examples(target, text)))
        # leave the per-task pass time to build the results of what the packs answered
        reserve = min(2.0, 0.1 * max(0.0, deadline - time.monotonic()))
        return self.source.find_packed(requests, pack_size, concurrency, max(0.0, deadline - reserve - time.monotonic()))

    def entities_for(self, target: NerTarget, text: str) -> Found:
        task = self.tasks[target.key]
        return self.source.find(task, text, self.select_examples(target, text))

    def chunk_chars(self, target: NerTarget, text: str = "") -> int:
        """The longest text one call carries: LLM_CONTEXT_CHARS, or less where the endpoint's context
        window (as the probe read it or a 400 named it) holds less after the instructions and the
        examples shown with `text` (its chunks' are alike, all within FEW_SHOT_TOKEN_BUDGET)."""
        window = self.llm.context_tokens
        if not window:
            return self.context_chars
        ratio = self.llm.chars_per_token
        examples = self.select_examples(target, text) if text else ()
        around = prompt_chars(self.tasks[target.key].messages("", examples)) / (ratio or CHARS_PER_TOKEN)
        return max(MIN_CHUNK_CHARS, min(self.context_chars, text_chars_for(window, around, ratio)))

    def aligned(self, target: NerTarget, text: str, outcome: TaskOutcome) -> tuple[Alignment, list[Found]]:
        """One LLM call for a text within the context budget; beyond it, one per overlapping chunk. A
        chunk the endpoint says is too long for its context window splits the text again, smaller."""
        size = self.chunk_chars(target, text) if len(text) > MIN_CHUNK_CHARS else self.context_chars
        for _ in range(RESPLITS):
            try:
                return self._aligned(target, text, outcome, size)
            except ContextTooLong as error:
                # sized to the window the 400 named; at least halved, whatever it named
                smaller = min(self.chunk_chars(target, text), size // 2)
                if smaller < MIN_CHUNK_CHARS or size <= MIN_CHUNK_CHARS:
                    raise _no_fit(error, size) from None
                log.info("the LLM endpoint's context window (%s tokens) is too small for %d characters of text"
                         " with the prompt: splitting the text into chunks of %d", error.window or "?", size, smaller)
                size = smaller
        return self._aligned(target, text, outcome, size)

    def _aligned(self, target: NerTarget, text: str, outcome: TaskOutcome, size: int) -> tuple[Alignment, list[Found]]:
        overlap = self.chunk_overlap if size >= self.context_chars else min(self.chunk_overlap, size // 4)
        chunks = split(text, size, overlap)
        ask = lambda chunk: self.entities_for(target, text[chunk.start : chunk.end])
        if len(chunks) == 1 and time_left() is None:
            # no deadline to keep (a project job): one call, in this thread. A pool per task cost every
            # task a thread start and, in that new thread, a new SQLite connection for the cache lookup
            calls = [Outcome(value=ask(chunks[0]))]
        else:
            # under a /predict's deadline, map_in_order runs a single chunk inline, in this thread
            calls = map_in_order(
                ask,
                chunks,
                # no more at once than the endpoint runs: the others would only spend their time budget waiting
                concurrency=min(4, len(chunks), self.llm.concurrency),
                deadline_seconds=3600.0,  # map_in_order caps it by the deadline of the /predict it runs under
            )
        founds: list[Found] = []
        answers: list[list[tuple[str, str]]] = []
        known = target.label_set
        for call in calls:
            if call.error is not None:
                raise call.error  # a text labelled in part would look complete to the annotator
            found = call.value
            founds.append(found)
            outcome.usage.add(found.usage)
            kept = [item for item in found.hinted() if item[1] in known]
            outcome.dropped["unknown_label"] += len(found.entities) - len(kept)
            answers.append(kept)
        options = {"label_all_mentions": self.label_all_mentions, "allow_overlap": target.allow_overlap}
        if len(chunks) == 1:
            return align(text, answers[0], **options), founds
        return align_chunks(text, chunks, answers, **options), founds

    def prelabel(self, data: dict[str, Any], task_id: Any = None) -> TaskOutcome:
        """The task's pre-labels; `task_id` names it in the log lines its work writes."""
        with about(f"task {task_id}" if task_id is not None else None):
            return self._prelabel(data, task_id)

    def _prelabel(self, data: dict[str, Any], task_id: Any) -> TaskOutcome:
        outcome = TaskOutcome()
        span_scores: list[float | None] = []
        empty_scores: list[float] = []
        for target in self.schema.targets:
            text = task_text(data, target)
            if not text.strip():
                continue
            alignment, founds = self.aligned(target, text, outcome)
            scores = {key: score for found in founds for key, score in found.scores.items()}
            outcome.dropped.update(alignment.dropped)
            regions = span_results(target, alignment.spans, scores)
            outcome.results.extend(regions)
            span_scores.extend(region.get("score") for region in regions)
            empties = [found.empty_score for found in founds if found.empty_score is not None]
            if empties:
                empty_scores.append(min(empties))
        dropped = {reason: count for reason, count in outcome.dropped.items() if count}
        if dropped:
            for reason, count in dropped.items():
                metrics.DROPPED.labels(reason).inc(count)
            log.info("task %s: dropped entities: %s", task_id if task_id is not None else "(no id)", dropped)
        outcome.score = confidence.task_score(span_scores, min(empty_scores) if empty_scores else None)
        return outcome
