"""Measure pre-labels against ground truth: in a Label Studio project, or offline on a CoNLL file.

In a project (`evaluate`): for each task with a ground-truth annotation (the one marked ground
truth, else the latest not cancelled) and a prediction of the chosen model version, the spans of
the project's first `<Labels>` → `<Text>` pair are compared with `scorer.score`. Tasks lacking
either side are counted and left out, so recall measures the pre-labels that were made.

Offline (`predict-conll`): the backend's own pipeline (Prelabeler, LLMClient, alignment) labels the
tasks import-conll would create, writes CoNLL with the predicted tags, and scores them when the
file has gold tags.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from backend.infra.errors import BackendError
from backend.infra.outputs import write_output
from backend.ner.labelconfig import NerTarget
from backend.tools.conll import build_units, labels_of, read_files, write_conll
from backend.tools.diagnosis import error_table, task_counts, worst_tasks
from backend.tools.importer import label_config_for, sdk_errors, target_of, task_data
from backend.tools.scorer import Report, SpanTuple, score

log = logging.getLogger(__name__)


# no request to answer offline: a week stands for "no deadline" (wait() refuses an infinite timeout)
OFFLINE_DEADLINE = 7 * 24 * 3600.0


class EvaluationError(BackendError):
    pass


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def result_spans(result: Sequence[Any] | None, target: NerTarget) -> list[SpanTuple]:
    """(start, end, label) of the span results of `target` in a stored annotation or prediction."""
    spans: list[SpanTuple] = []
    for region in result or []:
        if _get(region, "from_name") != target.from_name or _get(region, "to_name") != target.to_name:
            continue
        value = _get(region, "value") or {}
        start, end, labels = _get(value, "start"), _get(value, "end"), _get(value, "labels") or []
        if isinstance(start, int) and isinstance(end, int) and labels:
            spans.append((start, end, labels[0]))
    return sorted(spans)


def ground_truth(annotations: Sequence[Any]) -> Any | None:
    usable = [a for a in annotations or [] if not _get(a, "was_cancelled", False)]
    if not usable:
        return None
    marked = [a for a in usable if _get(a, "ground_truth", False)]
    return max(marked or usable, key=lambda a: _get(a, "id") or 0)


@dataclass
class ProjectEvaluation:
    project_id: int
    model_version: str
    report: Report
    tasks: int
    evaluated: int
    without_annotation: int
    without_prediction: int
    other_versions: list[str] = field(default_factory=list)
    # per evaluated task, for the error table and the worst tasks: (name, text, gold, predicted)
    items: list[tuple[str, str, list[SpanTuple], list[SpanTuple]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the user should know about the version chosen

    def header(self) -> str:
        lines = [*self.notes,
            f"project {self.project_id}, model version {self.model_version}: {self.evaluated} of {self.tasks} tasks"
            f" evaluated ({self.without_annotation} without ground truth,"
            f" {self.without_prediction} without a prediction of this version)"
        ]
        if self.other_versions:
            lines.append(f"other model versions in the project: {', '.join(self.other_versions)}")
        return "\n".join(lines)

    def to_json(self, worst: int = 5) -> dict[str, Any]:
        names, texts, gold, predicted = (list(column) for column in zip(*self.items)) if self.items else ([], [], [], [])
        labels = list(self.report.labels)
        return {
            "kind": "evaluate",
            "project": self.project_id,
            "model_version": self.model_version,
            "tasks": self.tasks,
            "evaluated": self.evaluated,
            "without_annotation": self.without_annotation,
            "without_prediction": self.without_prediction,
            **self.report.to_json(),
            "errors": error_table(gold, predicted, labels),
            "worst_tasks": worst_tasks(names, texts, gold, predicted, task_counts(gold, predicted, labels), worst),
        }


def evaluate_project(client: Any, project_id: int, model_version: str | None = None) -> ProjectEvaluation:
    with sdk_errors("evaluate"):
        project = client.projects.get(id=project_id)
        target = target_of(project.label_config or "")
        tasks = list(client.tasks.list(project=project_id, fields="all", page_size=200))
    versions: Counter = Counter()  # tasks holding a prediction of each version
    scorable: Counter = Counter()  # ... that also hold ground truth
    latest: dict[str, int] = {}
    for task in tasks:
        held = {_get(p, "model_version") or "" for p in _get(task, "predictions") or []}
        versions.update(held)
        if ground_truth(_get(task, "annotations") or []) is not None:
            scorable.update(held)
        for prediction in _get(task, "predictions") or []:
            version = _get(prediction, "model_version") or ""
            latest[version] = max(latest.get(version, 0), _get(prediction, "id") or 0)

    def present() -> str:
        return "; ".join(f"{v!r} on {versions[v]} tasks, {scorable[v]} with ground truth"
                         for v in sorted(versions, key=lambda v: -scorable[v]))

    notes: list[str] = []
    if model_version is None:
        if not versions:
            raise EvaluationError(f"project {project_id} has no predictions to evaluate")
        # the newest version is the one a user just ran; but opening one task after a change makes a
        # version of its own, newest and nearly empty: say so, and which one --model-version should name
        model_version = max(latest, key=lambda v: latest[v])
        best = max(scorable, key=lambda v: scorable[v], default=model_version)
        if scorable[model_version] < scorable[best]:
            if not scorable[model_version]:
                raise EvaluationError(
                    f"project {project_id}: the newest model version {model_version!r} has no task with ground truth "
                    f"to score. The project holds {present()}: choose one with --model-version, e.g. --model-version {best}")
            notes.append(f"note: the newest model version covers {scorable[model_version]} tasks with ground truth, "
                         f"{best!r} covers {scorable[best]}: --model-version {best} scores that one ({present()})")
    elif model_version not in versions:
        known = ", ".join(sorted(versions)) or "none"
        raise EvaluationError(f"project {project_id} has no predictions of model version {model_version!r} (it has: {known})")

    gold: list[list[SpanTuple]] = []
    predicted: list[list[SpanTuple]] = []
    items = []
    without_annotation = without_prediction = 0
    for task in sorted(tasks, key=lambda t: _get(t, "id") or 0):
        truth = ground_truth(_get(task, "annotations") or [])
        ours = [p for p in _get(task, "predictions") or [] if _get(p, "model_version") == model_version]
        if truth is None:
            without_annotation += 1
            continue
        if not ours:
            without_prediction += 1
            continue
        gold.append(result_spans(_get(truth, "result"), target))
        # several predictions of one version happen when a task is re-predicted: the newest counts
        newest = max(ours, key=lambda p: _get(p, "id") or 0)
        predicted.append(result_spans(_get(newest, "result"), target))
        text = (_get(task, "data") or {}).get(target.data_key)
        items.append((f"task {_get(task, 'id')}", text if isinstance(text, str) else "", gold[-1], predicted[-1]))
    if not gold:
        raise EvaluationError(
            f"project {project_id}: no task has both a ground-truth annotation and a prediction of"
            f" {model_version!r} ({without_annotation} tasks lack ground truth, {without_prediction} lack that prediction);"
            f" the project holds {present()}: choose one with --model-version"
        )
    return ProjectEvaluation(
        project_id=project_id,
        model_version=model_version,
        report=score(gold, predicted, labels=target.label_names),
        tasks=len(tasks),
        evaluated=len(gold),
        without_annotation=without_annotation,
        without_prediction=without_prediction,
        other_versions=sorted(v for v in versions if v != model_version),
        items=items,
        notes=notes,
    )


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    write_output(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


# ---- offline ----
@dataclass
class OfflineRun:
    units: int
    failed: int
    model: str
    report: Report | None  # None when the file has no gold entities

    def to_json(self) -> dict[str, Any]:
        return {"tasks": self.units, "failed": self.failed, "model": self.model,
                **(self.report.to_json() if self.report else {})}


def predict_conll(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    settings: Any,
    per: str = "document",
    labels: Sequence[str] | None = None,
    scheme: str = "IOB2",
    join: str = "auto",
    progress: bool = True,
) -> OfflineRun:
    from backend.infra.deadline import map_in_order
    from backend.llm.client import LLMClient
    from backend.llm.probe import probe_for
    from backend.ner.labelconfig import parse_label_config
    from backend.ner.templates import load_templates
    from backend.pipeline.prelabel import Prelabeler

    documents = read_files(paths)
    file_labels = labels_of(documents)
    chosen = list(labels) if labels else file_labels
    if not chosen:
        raise EvaluationError("the file has no entity tags: give the labels to predict with --labels PER,ORG,...")
    schema = parse_label_config(label_config_for(chosen))
    target = schema.targets[0]
    units = build_units(documents, per=per, join=join)
    llm = LLMClient(settings, prober=probe_for)
    prelabeler = Prelabeler.from_settings(settings, schema, load_templates(settings.prompts_dir, settings.occurrence_hints), llm)

    bar = tqdm(total=len(units), unit="task", desc="pre-labeling", file=sys.stderr, disable=not progress)

    def one(unit):
        try:
            return prelabeler.prelabel(task_data(unit, target))
        finally:
            bar.update(1)

    try:
        # log lines (LOG_LEVEL) go above the bar instead of through it
        with logging_redirect_tqdm():
            outcomes = map_in_order(one, units, concurrency=llm.concurrency, deadline_seconds=OFFLINE_DEADLINE)
            for unit, outcome in zip(units, outcomes):
                if outcome.error is not None:
                    log.warning("%s: no pre-labels: %s", unit.name, outcome.error)
    finally:
        bar.close()
    predicted: list[list[SpanTuple]] = []
    failed = 0
    for _unit, outcome in zip(units, outcomes):
        if outcome.error is not None:
            failed += 1
            predicted.append([])
            continue
        spans = [(r["value"]["start"], r["value"]["end"], r["value"]["labels"][0]) for r in outcome.value.results]
        predicted.append(sorted(spans))
    has_gold = bool(file_labels)
    write_conll(out, units, predicted, scheme=scheme, with_gold=has_gold)
    report = None
    if has_gold:
        gold = [[(e.start, e.end, e.label) for e in u.entities] for u in units]
        report = score(gold, predicted, labels=chosen)
    return OfflineRun(units=len(units), failed=failed, model=llm.model, report=report)
