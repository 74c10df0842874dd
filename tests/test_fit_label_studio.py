"""The learning loop through a real Label Studio 1.23.2: a correction submitted in Label Studio reaches
the backend as a webhook, becomes a few-shot example, and the next task opened is pre-labeled with it
under a new model_version."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import NER_CONFIG
from tests.processes import wait_until

pytestmark = pytest.mark.label_studio

# the LLM's mistake the annotator corrects: Jordan is a person
GAZETTEER = {"Jordan": "ORG", "Chicago Bulls": "ORG", "Pippen": "PER"}
TEXTS = [
    "Jordan signed with the Chicago Bulls in 1984.",
    "Pippen joined the Chicago Bulls in 1987.",
    "The Chicago Bulls won six titles.",
]


def backend_version(backend, project_id: int) -> str:
    return httpx.post(backend.url + "/setup", json={"project": str(project_id), "schema": NER_CONFIG}).json()["model_version"]


def labeled(text: str, surface: str, label: str) -> dict:
    start = text.index(surface)
    return {"from_name": "label", "to_name": "text", "type": "labels",
            "value": {"start": start, "end": start + len(surface), "text": surface, "labels": [label]}}


def shown_examples(request_body: dict) -> list[tuple[str, list]]:
    messages = request_body["messages"]
    pairs = []
    for user, assistant in zip(messages[1:-1:2], messages[2:-1:2]):
        text = user["content"].split("<text>\n", 1)[1].rsplit("\n</text>", 1)[0]
        pairs.append((text, [(e["text"], e["label"]) for e in json.loads(assistant["content"])["entities"]]))
    return pairs


def test_a_correction_submitted_in_label_studio_is_the_next_tasks_example_under_a_new_model_version(label_studio, backend_factory, llm):
    llm.gazetteer = dict(GAZETTEER)
    backend = backend_factory(workers=2)
    ls = label_studio.client()
    project = ls.projects.create(title="fit loop", label_config=NER_CONFIG)
    ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in TEXTS])
    ls.ml.create(url=backend.url, project=project.id, title="llm-ner", is_interactive=False)

    first = label_studio.open_next_task(project.id)
    (draft,) = ls.predictions.list(task=first["id"])
    assert [(r["value"]["text"], r["value"]["labels"][0]) for r in draft.result] == [("Jordan", "ORG"), ("Chicago Bulls", "ORG")]
    version_before = draft.model_version

    text = first["data"]["text"]
    annotation = ls.annotations.create(id=first["id"], result=[labeled(text, "Jordan", "PER"), labeled(text, "Chicago Bulls", "ORG")])
    # Label Studio sends ANNOTATION_CREATED to the backend by itself; the example set (and version) changes
    assert wait_until(lambda: backend_version(backend, project.id) != version_before, 30), "the backend's model_version to change"

    requests_before = len(llm.requests)
    second = label_studio.open_next_task(project.id)
    assert second["id"] != first["id"]
    (prediction,) = ls.predictions.list(task=second["id"])
    assert prediction.model_version != version_before
    assert prediction.model_version == backend_version(backend, project.id)
    (request,) = llm.requests[requests_before:]
    assert second["data"]["text"] in request["messages"][-1]["content"]
    assert shown_examples(request) == [(text, [("Jordan", "PER"), ("Chicago Bulls", "ORG")])]

    # deleting the annotation in Label Studio (ANNOTATIONS_DELETED, ids only) removes the example
    ls.annotations.delete(id=annotation.id)
    assert wait_until(lambda: backend_version(backend, project.id) == version_before, 30), "the example set to be empty again"


def test_start_training_rebuilds_the_examples_from_label_studios_annotations(label_studio, backend_factory, llm):
    llm.gazetteer = dict(GAZETTEER)
    ls = label_studio.client()
    project = ls.projects.create(title="rebuild", label_config=NER_CONFIG)
    ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in TEXTS])
    tasks = sorted(ls.tasks.list(project=project.id), key=lambda t: t.id)
    # annotated before the backend was connected: no webhook ever told the backend about these
    text = tasks[0].data["text"]
    ls.annotations.create(id=tasks[0].id, result=[labeled(text, "Jordan", "PER"), labeled(text, "Chicago Bulls", "ORG")])
    skipped = ls.annotations.create(id=tasks[2].id, result=[], was_cancelled=True)
    assert skipped.was_cancelled

    backend = backend_factory(workers=2, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token)
    ml = ls.ml.create(url=backend.url, project=project.id, title="llm-ner", is_interactive=False)
    version_before = backend_version(backend, project.id)
    started = time.monotonic()
    response = label_studio.api("POST", f"/api/ml/{ml.id}/train", json={})
    assert response.status_code < 300, response.text
    assert time.monotonic() - started < 5
    assert wait_until(lambda: backend_version(backend, project.id) != version_before, 60), "the rebuilt example set"

    second = label_studio.open_next_task(project.id)
    assert second["id"] == tasks[1].id
    assert shown_examples(llm.requests[-1]) == [(text, [("Jordan", "PER"), ("Chicago Bulls", "ORG")])]
    assert label_studio.token not in backend.log()
