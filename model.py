"""The model Label Studio talks to: LLM pre-labels for NER, improved by every human correction.

This file is the recipe; the machinery lives in `backend/` (the README has a module map):
  labelconfig.py  what to label (LabelInterface)     task.py         prompt and answer parsing
  answers.py      cache, then the LLM (llm.py)       alignment.py    entities -> exact spans
  example_store   corrections kept in SQLite         examples.py     which ones to show
  webhooks.py     Label Studio's events              interactive.py  the annotator's own marks
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from backend.protocol.base import LabelStudioMLBase
from backend.llm.source import EntitySource
from backend.infra.deadline import map_in_order
from backend.llm.cache import ResponseCache
from backend.learning.store import ExampleStore
from backend.pipeline.interactive import Marks, interactive_results, read_marks, remember_guidelines
from backend.ner.labelconfig import parse_label_config
from backend.pipeline.prelabel import Prelabeler
from backend.infra import usage
from backend.infra import metrics
from backend.ner import packing
from backend.pipeline import warmstart
from backend.learning import webhooks
from backend.protocol.wire import ModelResponse, PredictionValue

log = logging.getLogger("model")


class NERModel(LabelStudioMLBase):
    model_version_prefix = "llm-ner"

    def setup(self) -> None:
        # Raises UnsupportedLabelConfig (answered as 4xx) when there is no <Labels> -> <Text> pair.
        self.schema = parse_label_config(self.label_config)
        # Human corrections, shared by every worker through SQLite.
        self.examples = ExampleStore(self.services.db, self.project_id)

    def version_inputs(self) -> list[str]:
        # A new LLM, prompt, label config or example set must give a new version,
        # or Label Studio keeps serving the old pre-labels.
        return [
            self.services.llm.model, self.services.templates.fingerprint, self.label_config,
            self.examples.fingerprint(), self.guidelines(),
        ]

    def guidelines(self) -> str:
        # What annotators typed in the guidelines <TextArea> of their last submitted annotation.
        return self.get("guidelines") or ""

    def prelabeler(self, guidelines: str | None = None, version: str | None = None) -> Prelabeler:
        # `version`: the caller's model_version, when it has one (computing it reads the store)
        return Prelabeler(
            self.schema,
            self.services.templates,
            self.services.llm,
            guidelines=self.guidelines() if guidelines is None else guidelines,
            select_examples=self.examples.selector(self.settings.few_shot_k, self.settings.few_shot_token_budget),
            label_all_mentions=self.settings.label_all_mentions,
            context_chars=self.settings.llm_context_chars,
            chunk_overlap=self.settings.llm_chunk_overlap,
            source=EntitySource(self.services.llm, self.response_cache(), scope=version or self.model_version),
        )

    def response_cache(self) -> ResponseCache | None:
        return ResponseCache.in_dir(self.settings.model_dir, self.settings.llm_cache_max_rows) if self.settings.llm_cache else None

    def predict(self, tasks: list[dict[str, Any]], context: dict[str, Any] | None = None, **kwargs: Any) -> ModelResponse:
        version = self.model_version
        if context and len(tasks) == 1:  # interactive: the annotator's marks steer the answer
            marks = read_marks(context, self.schema, tasks[0].get("data") or {}, self.settings.guidelines_textarea)
            if marks:
                return ModelResponse(model_version=version, predictions=[self.predict_interactive(tasks[0], marks, version)])
        prelabeler = self.prelabeler(version=version)
        deadline = time.monotonic() + self.settings.predict_deadline
        if self.settings.pack_size > 1:  # short texts several to a call; each task below finds its answer
            packing.prefill(prelabeler, tasks, self.settings, deadline)
        outcomes = map_in_order(
            lambda task: prelabeler.prelabel(task.get("data") or {}),
            tasks,
            concurrency=self.settings.predict_concurrency,
            deadline_seconds=deadline - time.monotonic(),
        )
        prelabeler.source.flush()  # this request's answers, for every worker's next request
        usage.account(self.project_id, [None if o.error else o.value.usage for o in outcomes], self.settings)
        predictions = []
        for task, outcome in zip(tasks, outcomes):
            if outcome.error is not None:
                # One entry per task, always: a failed task gets an empty result, and a log line.
                log.warning("task %s: no pre-labels: %s", task.get("id"), outcome.error)
                predictions.append(PredictionValue(result=[], model_version=version))
            else:
                predictions.append(PredictionValue(result=outcome.value.results, score=outcome.value.score, model_version=version))
        # The LLM's drafts, so a correction can later be paired with what it corrected (preference export).
        self.examples.record_drafts(self.schema, tasks, [p.result if o.error is None else None for p, o in zip(predictions, outcomes)], version)
        return ModelResponse(model_version=version, predictions=predictions)

    def predict_interactive(self, task: dict[str, Any], marks: Marks, version: str) -> PredictionValue:
        results = interactive_results(
            task.get("data") or {}, marks, self.schema, functools.partial(self.prelabeler, version=version),
            use_llm=self.settings.interactive_llm, deadline_seconds=self.settings.interactive_deadline,
            templates=self.services.templates, base_guidelines=self.guidelines(),
        )
        if (cache := self.response_cache()) is not None:
            cache.flush()
        return PredictionValue(result=results, model_version=version)

    def fit(self, event: str, data: dict[str, Any], **kwargs: Any) -> None:
        if event in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            remember_guidelines(self, data)
        if event == "TASKS_CREATED" and self.settings.warm_start:
            warmstart.start(self, data)  # predicted in the background, so opening a task costs no LLM wait
        # Each correction becomes a few-shot example at once: no training job.
        webhooks.handle(event, data, self.schema, self.examples, self.settings)
        metrics.EXAMPLES.labels(self.project_id).set(self.examples.count())
