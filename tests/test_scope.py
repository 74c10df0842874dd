"""Which tasks a project job pre-labels (pipeline/scope.py), from either listing Label Studio gives:
every prediction and annotation (fields="all"), or only their counts and the joined prediction
versions (`include=LISTED_FIELDS`, what jobs ask for). Both must choose the same tasks."""

from __future__ import annotations

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
