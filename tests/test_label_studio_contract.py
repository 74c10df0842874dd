"""Contract with a real Label Studio 1.23.2: it connects the backend and stores its pre-labels.

The backend runs as users run it (`llm-ner serve`, gunicorn, 2 workers); the LLM is the fake server.
Label Studio asks for predictions the two ways it does in real use: a task opened the way the
labeling UI opens it, and the data manager's "Retrieve predictions" action on several tasks.
"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import NER_CONFIG

pytestmark = pytest.mark.label_studio

GAZETTEER = {"Ada Lovelace": "PER", "Charles Babbage": "PER", "London": "LOC", "Royal Society": "ORG", "Analytical Engine": "MISC"}
TEXTS = [
    "Ada Lovelace met Charles Babbage in London.",
    "The Royal Society in London heard of the Analytical Engine.",
    "Nothing to see here.",
    "Charles Babbage designed the Analytical Engine; Ada Lovelace wrote about it.",
]


def expected_spans(text: str) -> list[tuple[int, int, str, str]]:
    spans = []
    for surface, label in GAZETTEER.items():
        start = text.find(surface)
        while start != -1:
            spans.append((start, start + len(surface), surface, label))
            start = text.find(surface, start + 1)
    return sorted(spans)


def stored_spans(prediction) -> list[tuple[int, int, str, str]]:
    return sorted(
        (r["value"]["start"], r["value"]["end"], r["value"]["text"], r["value"]["labels"][0]) for r in prediction.result
    )


@pytest.fixture
def connected_project(label_studio, backend_factory, llm):
    """A new NER project with TEXTS imported and this backend connected as its model."""
    llm.gazetteer = dict(GAZETTEER)
    backend = backend_factory(workers=2)
    ls = label_studio.client()
    project = ls.projects.create(title="contract", label_config=NER_CONFIG)
    ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in TEXTS])
    ml = ls.ml.create(url=backend.url, project=project.id, title="llm-ner", is_interactive=False)
    tasks = sorted(ls.tasks.list(project=project.id), key=lambda t: t.id)
    yield ls, project, tasks, backend, ml


def predictions_of(ls, task_id: int):
    return list(ls.predictions.list(task=task_id))


def test_task_opened_in_the_labeling_ui_gets_exact_pre_labels(label_studio, connected_project, llm):
    ls, project, tasks, backend, _ = connected_project
    opened = label_studio.open_next_task(project.id)
    (prediction,) = predictions_of(ls, opened["id"])
    assert stored_spans(prediction) == expected_spans(opened["data"]["text"])
    setup_version = httpx.post(backend.url + "/setup", json={"project": str(project.id), "schema": NER_CONFIG}).json()["model_version"]
    assert prediction.model_version == setup_version
    # one LLM request, for exactly the opened task's text
    assert len(llm.requests) == 1
    assert opened["data"]["text"] in llm.requests[0]["messages"][-1]["content"]


def test_retrieve_predictions_action_labels_every_task_in_one_call(label_studio, connected_project, llm):
    ls, project, tasks, backend, _ = connected_project
    response = label_studio.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}",
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert response.status_code == 200, response.text
    for task in tasks:
        predictions = predictions_of(ls, task.id)
        assert len(predictions) == 1, f"task {task.id} has {len(predictions)} predictions"
        assert stored_spans(predictions[0]) == expected_spans(task.data["text"])
        for region in predictions[0].result:
            value = region["value"]
            assert task.data["text"][value["start"]:value["end"]] == value["text"]
    assert len(llm.requests) == len(TEXTS)
    # asking again makes no new predictions: the model_version is unchanged
    label_studio.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}",
        json={"selectedItems": {"all": True, "excluded": []}})
    assert all(len(predictions_of(ls, t.id)) == 1 for t in tasks)
