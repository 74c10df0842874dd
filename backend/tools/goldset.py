"""Ground truth for `compare` and `simulate`: the annotated tasks of a Label Studio project, or CoNLL files.

Both become the same list of `GoldTask`s, in a fixed order (task id, or file order): the task data the
pipeline is given, the gold spans of the first `<Labels>` → `<Text>` pair (what `evaluate` scores), the
gold as Label Studio regions (to replay it as an annotation), and, for a project, the newest stored
prediction of each model version.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from backend.ner.labelconfig import NerSchema, NerTarget, parse_label_config
from backend.tools.conll import build_units, labels_of, read_files
from backend.tools.evaluation import EvaluationError, _get, ground_truth, result_spans
from backend.tools.importer import gold_results, label_config_for, sdk_errors, task_data
from backend.tools.scorer import SpanTuple


@dataclass
class GoldTask:
    name: str  # how reports name it: "task 12", "wikigold.conll.txt#d3"
    task_id: int
    data: dict[str, Any]
    text: str  # the scored target's text
    gold: list[SpanTuple]
    regions: list[dict[str, Any]]  # the gold as Label Studio results, as an annotator would submit them
    stored: dict[str, list[SpanTuple]] = field(default_factory=dict)  # model version -> its newest prediction


@dataclass
class GoldSet:
    description: str
    schema: NerSchema  # the scored target only: nothing is asked for targets no figure reads
    tasks: list[GoldTask]
    without_ground_truth: int = 0
    versions: list[str] = field(default_factory=list)  # model versions with stored predictions

    @property
    def target(self) -> NerTarget:
        return self.schema.targets[0]

    @property
    def labels(self) -> list[str]:
        return list(self.target.label_names)


def sample(tasks: Sequence[GoldTask], limit: int | None, seed: int) -> list[GoldTask]:
    """`limit` tasks drawn with `seed`, kept in their original order (all of them without a limit).

    A random draw rather than the first N: the first documents of a file are rarely typical of it."""
    if limit is None or limit >= len(tasks):
        return list(tasks)
    if limit < 1:
        raise EvaluationError("--limit must be at least 1")
    chosen = sorted(random.Random(seed).sample(range(len(tasks)), limit))
    return [tasks[i] for i in chosen]


def from_conll(paths: Sequence[str | Path], per: str = "document", join: str = "auto") -> GoldSet:
    documents = read_files(paths)
    labels = labels_of(documents)
    names = ", ".join(Path(p).name for p in paths)
    if not labels:
        raise EvaluationError(f"{names}: no entity tags, so no ground truth to score against")
    schema = parse_label_config(label_config_for(labels))
    target = schema.targets[0]
    tasks = [
        GoldTask(
            name=unit.name,
            task_id=i + 1,
            data=task_data(unit, target),
            text=unit.text,
            gold=sorted((e.start, e.end, e.label) for e in unit.entities),
            regions=gold_results(unit, target),
        )
        for i, unit in enumerate(build_units(documents, per=per, join=join))
    ]
    return GoldSet(f"{names} ({len(tasks)} {per}s)", schema, tasks)


def from_project(client: Any, project_id: int) -> GoldSet:
    """The project's tasks that have a ground-truth annotation (the one marked ground truth, else the
    newest not cancelled), in task id order."""
    with sdk_errors(f"reading project {project_id}"):
        project = client.projects.get(id=project_id)
        config = project.label_config or ""
        raw = list(client.tasks.list(project=project_id, fields="all", page_size=200))
    full = parse_label_config(config)
    schema = replace(full, targets=full.targets[:1])
    target = schema.targets[0]
    tasks: list[GoldTask] = []
    versions: set[str] = set()
    missing = 0
    for task in sorted(raw, key=lambda t: _get(t, "id") or 0):
        stored: dict[str, tuple[int, list[SpanTuple]]] = {}
        for prediction in _get(task, "predictions") or []:
            version = _get(prediction, "model_version") or ""
            versions.add(version)
            pid = _get(prediction, "id") or 0
            if version not in stored or pid > stored[version][0]:  # a re-predicted task: the newest counts
                stored[version] = (pid, result_spans(_get(prediction, "result"), target))
        truth = ground_truth(_get(task, "annotations") or [])
        data = _get(task, "data") or {}
        text = data.get(target.data_key)
        if truth is None or not isinstance(text, str):
            missing += 1
            continue
        regions = [r if isinstance(r, dict) else r.model_dump() for r in _get(truth, "result") or []]
        tasks.append(
            GoldTask(
                name=f"task {_get(task, 'id')}",
                task_id=int(_get(task, "id")),
                data=dict(data),
                text=text,
                gold=result_spans(regions, target),
                regions=regions,
                stored={version: spans for version, (_, spans) in stored.items()},
            )
        )
    if not tasks:
        raise EvaluationError(
            f"project {project_id} has no ground truth: none of its {len(raw)} tasks has a submitted annotation"
            " (annotate some tasks, or import CoNLL with --gold annotations)"
        )
    return GoldSet(f"project {project_id} ({len(tasks)} annotated tasks)", schema, tasks, missing, sorted(versions))
