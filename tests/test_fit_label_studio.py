"""The learning loop through a real Label Studio 1.23.2: a correction submitted in Label Studio reaches
the backend as a webhook, becomes a few-shot example, and the next task opened is pre-labeled with it
under a new model_version."""

from __future__ import annotations

import time

import pytest

from tests.conftest import region_tuples, shown_examples, span
from tests.processes import wait_until

pytestmark = pytest.mark.label_studio

# the LLM's mistake the annotator corrects: Jordan is a person
GAZETTEER = {"Jordan": "ORG", "Chicago Bulls": "ORG", "Pippen": "PER"}
TEXTS = [
    "Jordan signed with the Chicago Bulls in 1984.",
    "Pippen joined the Chicago Bulls in 1987.",
    "The Chicago Bulls won six titles.",
]


def test_a_correction_submitted_in_label_studio_is_the_next_tasks_example_under_a_new_model_version(connected_project, llm):
    llm.gazetteer = dict(GAZETTEER)
    project = connected_project(TEXTS, title="fit loop")

    first = project.open_next_task()
    (draft,) = project.predictions(first["id"])
    assert region_tuples(draft.result, "text", "label") == [("Jordan", "ORG"), ("Chicago Bulls", "ORG")]
    version_before = draft.model_version

    text = first["data"]["text"]
    annotation = project.ls.annotations.create(id=first["id"], result=[span(text, "Jordan", "PER"), span(text, "Chicago Bulls", "ORG")])
    # Label Studio sends ANNOTATION_CREATED to the backend by itself; the example set (and version) changes
    assert wait_until(lambda: project.model_version() != version_before, 30), "the backend's model_version to change"

    requests_before = len(llm.requests)
    second = project.open_next_task()
    assert second["id"] != first["id"]
    (prediction,) = project.predictions(second["id"])
    assert prediction.model_version != version_before
    assert prediction.model_version == project.model_version()
    (request,) = llm.requests[requests_before:]
    assert second["data"]["text"] in request["messages"][-1]["content"]
    assert shown_examples(request) == [(text, [("Jordan", "PER"), ("Chicago Bulls", "ORG")])]

    # deleting the annotation in Label Studio (ANNOTATIONS_DELETED, ids only) removes the example
    project.ls.annotations.delete(id=annotation.id)
    assert wait_until(lambda: project.model_version() == version_before, 30), "the example set to be empty again"


def test_start_training_rebuilds_the_examples_from_label_studios_annotations(label_studio, connected_project, backend_factory, llm):
    llm.gazetteer = dict(GAZETTEER)
    project = connected_project(TEXTS, title="rebuild", connect=False)
    tasks = project.tasks()
    # annotated before the backend was connected: no webhook ever told the backend about these
    text = tasks[0].data["text"]
    project.ls.annotations.create(id=tasks[0].id, result=[span(text, "Jordan", "PER"), span(text, "Chicago Bulls", "ORG")])
    skipped = project.ls.annotations.create(id=tasks[2].id, result=[], was_cancelled=True)
    assert skipped.was_cancelled

    backend = backend_factory(workers=2, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token)
    ml = project.connect(backend)
    version_before = project.model_version()
    started = time.monotonic()
    response = label_studio.api("POST", f"/api/ml/{ml.id}/train", json={})
    assert response.status_code < 300, response.text
    assert time.monotonic() - started < 5
    assert wait_until(lambda: project.model_version() != version_before, 60), "the rebuilt example set"

    second = project.open_next_task()
    assert second["id"] == tasks[1].id
    assert shown_examples(llm.requests[-1]) == [(text, [("Jordan", "PER"), ("Chicago Bulls", "ORG")])]
    assert label_studio.token not in backend.log()
