"""Which tasks a project job pre-labels (pipeline/scope.py, read by pipeline/jobs/tries.py `tasks_in_scope`), from either listing Label Studio gives:
every prediction and annotation (fields="all"), or only their counts and the joined prediction
versions (`include=LISTED_FIELDS`, what jobs ask for). Both must choose the same tasks."""

from __future__ import annotations

from typing import Any

import pytest

from backend.pipeline.scope import LISTED_FIELDS, SCOPES, listed_fields, wanted

CURRENT, OLD = "llm-ner-current", "llm-ner-old"


def task(predictions: list[tuple[str, str]], annotations: list[bool]) -> tuple[dict, dict]:
    """The same task as both listings show it: predictions as (model_version, created_at), annotations as
    was_cancelled flags (Label Studio's total_annotations leaves the cancelled ones out)."""
    full = {
        "id": 1, "data": {"text": "t"},
        "predictions": [{"id": i, "model_version": v, "created_at": at} for i, (v, at) in enumerate(predictions)],
        "annotations": [{"was_cancelled": cancelled} for cancelled in annotations],
        "total_annotations": sum(not c for c in annotations), "total_predictions": len(predictions),
    }
    listed = {
        "id": 1, "data": {"text": "t"}, "total_predictions": len(predictions),
        "total_annotations": sum(not c for c in annotations),
        "predictions_model_versions": ",".join(dict.fromkeys(v for v, _ in predictions)),
    }
    assert set(listed) == set(LISTED_FIELDS.split(","))
    return full, listed


CASES = {
    "nothing": ([], []),
    "an old prediction": ([(OLD, "2026-01-01")], []),
    "the current prediction": ([(CURRENT, "2026-01-02")], []),
    "old then current": ([(OLD, "2026-01-01"), (CURRENT, "2026-01-02")], []),
    "annotated, old prediction": ([(OLD, "2026-01-01")], [False]),
    "annotated, no prediction": ([], [False]),
    "a cancelled annotation only": ([(OLD, "2026-01-01")], [True]),
}

EXPECTED = {  # scope -> the cases it pre-labels
    "missing": {"nothing", "annotated, no prediction"},
    "unannotated": {"nothing", "an old prediction", "a cancelled annotation only"},
    "stale": {"an old prediction", "a cancelled annotation only"},
    "all": {"nothing", "an old prediction", "annotated, old prediction", "annotated, no prediction", "a cancelled annotation only"},
}


@pytest.mark.parametrize("scope", SCOPES)
def test_each_scope_chooses_its_tasks_from_the_full_listing(scope):
    chosen = {name for name, (predictions, annotations) in CASES.items() if wanted(task(predictions, annotations)[0], CURRENT, scope)}
    assert chosen == EXPECTED[scope]


@pytest.mark.parametrize("scope", [s for s in SCOPES if listed_fields(s, CURRENT) is not None])
def test_the_listed_fields_choose_the_same_tasks(scope):
    chosen = {name for name, (predictions, annotations) in CASES.items() if wanted(task(predictions, annotations)[1], CURRENT, scope)}
    assert chosen == EXPECTED[scope]


def test_stale_and_a_version_with_a_comma_list_every_field():
    assert listed_fields("stale", CURRENT) is None
    assert listed_fields("missing", "model,with-comma") is None
    assert listed_fields("missing", CURRENT) == LISTED_FIELDS


# ---- tasks_in_scope: the one reading of "which tasks a job pre-labels", through a real Label Studio ----

COMMA = "llm-ner-current,with-comma"  # a version a joined listing cannot tell apart: every field is listed
_projects: dict[str, int] = {}


def project_of_cases(label_studio, version: str) -> tuple[Any, int]:
    """A project of the session's Label Studio with one task per case of CASES (its text: the case's
    name), the predictions made in order (the newest last) and the annotations as the case says."""
    from tests.conftest import NER_CONFIG

    ls = label_studio.client()
    if version not in _projects:
        project = ls.projects.create(title=f"scopes {version}", label_config=NER_CONFIG)
        ls.projects.import_tasks(id=project.id, request=[{"text": name} for name in CASES])
        for listed in ls.tasks.list(project=project.id):
            predictions, annotations = CASES[listed.data["text"]]
            for made, _ in predictions:
                ls.predictions.create(task=listed.id, result=[], model_version=version if made == CURRENT else made)
            for cancelled in annotations:
                ls.annotations.create(id=listed.id, result=[], was_cancelled=cancelled)
        _projects[version] = project.id
    return ls, _projects[version]


@pytest.mark.label_studio
@pytest.mark.parametrize("version", [CURRENT, COMMA])
@pytest.mark.parametrize("scope", SCOPES)
def test_tasks_in_scope_reads_each_scopes_tasks_from_label_studio(label_studio, scope, version):
    from backend.pipeline.jobs.records import JobSpec
    from backend.pipeline.jobs.tries import Reading, tasks_in_scope

    ls, project_id = project_of_cases(label_studio, version)
    reading = Reading()
    chosen = [task["data"]["text"] for task in tasks_in_scope(ls, JobSpec(project_id, scope), version, reading)]
    assert sorted(chosen) == sorted(EXPECTED[scope])
    assert (reading.seen, reading.skipped) == (len(CASES), len(CASES) - len(EXPECTED[scope]))


@pytest.mark.label_studio
def test_tasks_in_scope_stops_at_the_limit_and_can_name_the_tasks_it_leaves(label_studio):
    from backend.pipeline.jobs.records import JobSpec
    from backend.pipeline.jobs.tries import Reading, tasks_in_scope

    ls, project_id = project_of_cases(label_studio, CURRENT)
    reading = Reading()
    limited = list(tasks_in_scope(ls, JobSpec(project_id, "all", limit=2), CURRENT, reading))
    assert len(limited) == 2 and {t["data"]["text"] for t in limited} <= EXPECTED["all"]
    assert reading.seen - reading.skipped == 2
    every = list(tasks_in_scope(ls, JobSpec(project_id, "stale"), CURRENT, out_of_scope=True))
    assert len(every) == len(CASES)  # a None for each task the scope leaves: an estimate samples both
    assert sorted(t["data"]["text"] for t in every if t is not None) == sorted(EXPECTED["stale"])
