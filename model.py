"""The model Label Studio talks to: LLM pre-labels for NER, improved by every human correction.

This file is the recipe; the machinery lives in `backend/` (the README has a module map):
  predict: an annotator's marks? -> interactive answer; else pre-label every task -> record drafts
  fit:     a submitted annotation (checked, or read from Label Studio) -> a few-shot example and
           guidelines; new tasks -> warm start
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from backend.infra import metrics
from backend.infra.storage import STORE_ERRORS, StoreUnavailable
from backend.infra.usage import Meter, metering
from backend.learning import webhooks
from backend.learning.store import ExampleStore
from backend.llm.batch import BatchAnswers, BatchLLM, batch_endpoint, provider_client
from backend.llm.client import LLMClient
from backend.ner.labelconfig import parse_label_config
from backend.pipeline import warmstart
from backend.pipeline.delivery import Delivery, predicted_in_label_studio
from backend.pipeline.interactive import (
    MAX_GUIDELINES_CHARS,
    Marks,
    interactive_results,
    read_marks,
    submitted_guidelines,
)
from backend.pipeline.jobs.batch import Batches, BatchJob
from backend.pipeline.jobs.parts import PartRun
from backend.pipeline.jobs.process import ProjectJob
from backend.pipeline.jobs.records import JobSpec
from backend.pipeline.jobs.tries import JobRun
from backend.pipeline.prelabel import Prelabeler, unanswered_reason
from backend.protocol.base import LabelStudioMLBase
from backend.protocol.wire import ModelResponse, PredictionValue

log = logging.getLogger("model")


class NERModel(LabelStudioMLBase):
    model_version_prefix = "llm-ner"

    def setup(self) -> None:
        # Raises UnsupportedLabelConfig (answered as 4xx) when there is no <Labels> -> <Text> pair.
        self.schema = parse_label_config(self.label_config)
        # Human corrections, shared by every worker through the store.
        self.examples = ExampleStore(self.services.db, self.project_id, self.services.example_indexes)

    def version_inputs(self) -> list[str]:
        # A new LLM, prompt, label config or example set must give a new version,
        # or Label Studio keeps serving the old pre-labels.
        return [self.services.llm.model, self.services.templates.fingerprint, self.label_config, self.learned()]

    def learned(self) -> str:
        """What corrections taught (examples and guidelines), as the version shows it: a burst of
        webhooks changes it at most once per VERSION_COALESCE_SECONDS, so it cannot churn."""
        current = hashlib.sha256(f"{self.examples.fingerprint()}\0{self.guidelines()}".encode()).hexdigest()[:16]
        return self.services.db.published(self.project_id, "learned", current, self.settings.version_coalesce_seconds)

    def guidelines(self) -> str:
        # What annotators typed in the guidelines <TextArea> of their last submitted annotation.
        return self.get("guidelines") or ""

    def prelabeler(self, version: str, guidelines: str | None = None, llm: LLMClient | None = None) -> Prelabeler:
        return Prelabeler.from_settings(
            self.settings, self.schema, self.services.templates, llm or self.services.llm,  # llm: a batch job's
            cache=self.services.cache,
            scope=version,  # a new model_version never reuses an answer cached for an old one
            # the index is rebuilt when what is published changes, not on every webhook
            select_examples=self.examples.selector(self.settings.few_shot_k, self.settings.few_shot_token_budget, self.learned()),
            guidelines=self.guidelines() if guidelines is None else guidelines,
        )

    def predict(self, tasks: list[dict[str, Any]], context: dict[str, Any] | None = None, **kwargs: Any) -> ModelResponse:
        version = self.model_version
        if context and len(tasks) == 1:  # interactive: the annotator's marks steer the answer
            marks = read_marks(context, self.schema, tasks[0].get("data") or {}, self.settings.guidelines_textarea)
            if marks:
                return ModelResponse(model_version=version, predictions=[self.predict_interactive(tasks[0], marks, version)])
        prelabeler = self.prelabeler(version)
        started = time.monotonic()
        concurrency = self.services.llm.concurrency  # PREDICT_CONCURRENCY, or what the probe measured (probes once)
        with metering() as meter:  # every LLM call of this request, failed tasks' too
            outcomes = prelabeler.prelabel_many(
                tasks,
                concurrency=concurrency,
                deadline_seconds=self.settings.predict_deadline - (time.monotonic() - started),
                pack_size=self.settings.pack_size,
                pack_max_chars=self.settings.pack_max_chars,
                # tasks the deadline cuts run on (PREDICT_BACKLOG): cached, and written into Label Studio
                keep_late=(lambda i: self.keep_late(prelabeler, tasks[i], version, meter)) if self.settings.predict_backlog else None,
            )
        self.services.usage.account(self.project_id, len(tasks), meter.take(), self.services.price)
        predictions: list[PredictionValue | None] = []
        for task, outcome in zip(tasks, outcomes):
            if outcome.error is not None:
                # One entry per task, always; a failed task gets none (Label Studio asks again later),
                # never an empty prediction, which it would keep as the task's pre-labels for good.
                log.warning("task %s: no pre-labels (asked again later): %s", task.get("id"), outcome.error)
                metrics.UNANSWERED.labels(unanswered_reason(outcome.error)).inc()
                predictions.append(None)
            else:
                predictions.append(PredictionValue(result=outcome.value.results, score=outcome.value.score, model_version=version))
        # (the warm start only fills the cache: it delivers nothing, so it claims nothing either, and
        # Label Studio's own /predict for those tasks is answered from the cache)
        if self.services.writer is not None and not kwargs.get("cache_only"):
            predictions = self.claim_deliveries(tasks, predictions, version)
        # The LLM's drafts, so a correction can later be paired with what it corrected (preference export).
        self.examples.record_drafts(self.schema, tasks, [p.result if p is not None else None for p in predictions], version)
        return ModelResponse(model_version=version, predictions=predictions)

    def prelabel_project(self, client: Any, spec: JobSpec, total: int | None = None, on_progress=None,
                         llm: LLMClient | None = None) -> ProjectJob:
        """A job that pre-labels the project's tasks in `spec.scope` with this model (`job.run()` runs it);
        `llm`: another client for its calls (a Batch API job's, see pipeline/jobs/batch.py)."""
        version = self.model_version
        return ProjectJob(self.job_run(client, spec, self.services.jobs.create(spec, version, total), version, llm), on_progress)

    def prelabel_part(self, client: Any, job_id: str, part: int, spec: JobSpec, version: str, tasks: list[dict[str, Any]]) -> PartRun:
        """One part of a job on RQ (`llm-ner worker`), with the job's model_version (`run()` runs it)."""
        return PartRun(self.job_run(client, spec, job_id, version), part, tasks)

    def job_run(self, client: Any, spec: JobSpec, job_id: str, version: str, llm: LLMClient | None = None) -> JobRun:
        """What a runner of the job is handed (pipeline/jobs/tries.py), with this project's pre-labeler."""
        services = self.services
        return JobRun(
            services.jobs, job_id, spec, client, self.prelabeler(version, llm=llm), version, services.deliveries,
            services.usage, services.price,
            record_drafts=lambda tasks, results: self.examples.record_drafts(self.schema, tasks, results, version),
        )

    def batch_project(self, client: Any, spec: JobSpec, total: int | None = None, on_progress=None,
                      say=lambda message: None) -> tuple[BatchJob, Prelabeler]:
        """A project job through the provider's Batch API (pipeline/jobs/batch.py), and the pre-labeler
        that records its requests: `batch.run(recorder)` runs it."""
        services, settings = self.services, self.settings
        answers = BatchAnswers(services.db)
        job = self.prelabel_project(client, spec, total, on_progress, llm=BatchLLM(services.llm, answers))
        batch = BatchJob(
            job, provider_client(settings), answers, Batches(services.db),
            batch_endpoint(settings.openai_base_url, settings.llm_batch_endpoint),
            settings.batch_poll_seconds, settings.batch_max_requests, settings.batch_max_bytes, say=say,
        )
        return batch, self.prelabeler(job.version, llm=BatchLLM(services.llm, answers, sink=batch.sink))

    def keep_late(self, prelabeler: Prelabeler, task: dict[str, Any], version: str, meter: Meter | None = None):
        """A task the deadline cut keeps running in the background, within PREDICT_BACKLOG; its answer
        reaches the cache (a second Retrieve Predictions is answered from it) and, with Label Studio
        credentials, Label Studio itself."""
        backlog = self.services.backlog
        if not backlog.admit():
            return None
        metrics.BACKLOG.inc()

        def done(outcome) -> None:
            backlog.done()
            metrics.BACKLOG.dec()
            if meter is not None:  # the calls made after the request was answered
                self.services.usage.account(self.project_id, 0, meter.take(), self.services.price)
            prelabeler.flush()  # every worker's next request finds the answer
            if outcome.error is not None:
                log.warning("task %s: no pre-labels after the deadline either: %s", task.get("id"), outcome.error)
                return
            results, task_id = outcome.value.results, task.get("id")
            self.examples.record_drafts(self.schema, [task], [results], version)
            if self.services.writer is not None and isinstance(task_id, int):
                self.services.writer.submit(Delivery(self.project_id, task_id, version, results, outcome.value.score))

        return done

    def claim_deliveries(self, tasks: list[dict[str, Any]], predictions: list[PredictionValue | None], version: str):
        """A task whose prediction of this version Label Studio holds already, or that another writer (work a
        deadline cut, a project job) is writing right now, is answered [], so Label Studio never holds it
        twice; Label Studio asks again later for one it still lacks. A claim whose write ended stands
        for nothing: Label Studio is read (pipeline/delivery.py)."""
        answered = [t["id"] for t, p in zip(tasks, predictions) if p is not None and isinstance(t.get("id"), int)]
        client = self.services.label_studio
        try:
            if answered and self.services.db.failing():  # known down: not another wait of CONNECT_TIMEOUT
                raise self.services.db.unavailable(RuntimeError("a write failed lately and none succeeded since"))
            claims = self.services.deliveries.acquire(
                self.project_id, version, answered, None, lambda ids: predicted_in_label_studio(client, self.project_id, ids, version)
            )
        except (*STORE_ERRORS, StoreUnavailable) as error:
            # the LLM calls are paid: answer them (a task the backend wrote itself before the store went
            # away may then hold two predictions of this version) rather than a 503 that throws them away
            metrics.STORE_WRITES_LOST.labels("claims").inc()
            log.warning("project %s: %d pre-labels answered without their delivery claims, the store cannot be written: %s",
                        self.project_id, len(answered), error)
            return predictions
        if claims.pending:
            log.info("project %s: %d tasks answered [] (being written by another, Label Studio asks again later)",
                     self.project_id, len(claims.pending))
        mine = claims.mine
        return [p if p is None or not isinstance(t.get("id"), int) or t["id"] in mine else None for t, p in zip(tasks, predictions)]

    def predict_interactive(self, task: dict[str, Any], marks: Marks, version: str) -> PredictionValue:
        results = interactive_results(
            task.get("data") or {}, marks, self.schema, lambda guidelines: self.prelabeler(version, guidelines),
            use_llm=self.settings.interactive_llm, deadline_seconds=self.settings.interactive_deadline,
            templates=self.services.templates, base_guidelines=self.guidelines(),
        )
        if self.services.cache is not None:
            self.services.cache.flush()
        return PredictionValue(result=results, model_version=version)

    def fit(self, event: str, data: dict[str, Any], **kwargs: Any) -> webhooks.Learned:
        # Each correction becomes a few-shot example at once: no training job.
        learned = webhooks.handle(
            event, data, self.schema, self.examples, self.settings, self.services.rebuilds,
            trust=self.services.trust, source=self.services.label_studio_source,
        )
        if learned.result is not None:  # a valid annotation, stored: its guidelines box counts
            self.remember_guidelines(learned.result, learned.annotation_id)
        if learned.tasks:
            # predicted in the background, so opening a task costs no LLM wait
            warmstart.start(self, learned.tasks, self.services.warm_start)
        metrics.EXAMPLES.labels(self.project_id).set(self.examples.count())
        return learned

    def remember_guidelines(self, result: list[dict[str, Any]], annotation_id: int | None) -> None:
        """A submitted annotation's guidelines text becomes the project's guidelines (a new model_version)."""
        text = submitted_guidelines(result, self.schema, self.settings.guidelines_textarea)
        if text is None or text == self.guidelines():
            return
        if len(text) > MAX_GUIDELINES_CHARS:
            log.warning("project %s: guidelines of annotation %s ignored: %d characters, more than %d",
                        self.project_id, annotation_id, len(text), MAX_GUIDELINES_CHARS)
            return
        self.set("guidelines", text)
        log.info("project %s: guidelines updated from annotation %s", self.project_id, annotation_id)
