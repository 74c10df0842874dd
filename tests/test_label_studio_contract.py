"""Contract with a real Label Studio 1.23.2: it connects the backend and stores its pre-labels.

The backend runs as users run it (`llm-ner serve`, gunicorn, 2 workers); the LLM is the fake server.
Label Studio asks for predictions the two ways it does in real use: a task opened the way the
labeling UI opens it, and the data manager's "Retrieve predictions" action on several tasks.
"""

from __future__ import annotations

import pytest

from tests.conftest import region_tuples

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
    return sorted(region_tuples(prediction.result, "start", "end", "text", "label"))


@pytest.fixture
def project(connected_project, llm):
    """A new NER project with TEXTS imported and this backend (gunicorn, 2 workers) connected as its model."""
    llm.gazetteer = dict(GAZETTEER)
    return connected_project(TEXTS, title="contract")


def test_task_opened_in_the_labeling_ui_gets_exact_pre_labels(project, llm):
    opened = project.open_next_task()
    (prediction,) = project.predictions(opened["id"])
    assert stored_spans(prediction) == expected_spans(opened["data"]["text"])
    assert prediction.model_version == project.model_version()
    # one LLM request, for exactly the opened task's text
    assert len(llm.requests) == 1
    assert opened["data"]["text"] in llm.requests[0]["messages"][-1]["content"]


def test_retrieve_predictions_action_labels_every_task_in_one_call(label_studio, project, llm):
    label_studio.retrieve_predictions(project.id)
    tasks = project.tasks()
    for task in tasks:
        predictions = project.predictions(task.id)
        assert len(predictions) == 1, f"task {task.id} has {len(predictions)} predictions"
        assert stored_spans(predictions[0]) == expected_spans(task.data["text"])
        for region in predictions[0].result:
            value = region["value"]
            assert task.data["text"][value["start"]:value["end"]] == value["text"]
    assert len(llm.requests) == len(TEXTS)
    # asking again makes no new predictions: the model_version is unchanged
    label_studio.retrieve_predictions(project.id)
    assert [len(project.predictions(t.id)) for t in tasks] == [1] * len(TEXTS)
