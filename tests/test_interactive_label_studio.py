"""Interactive pre-annotation through a real Label Studio 1.23.2.

The backend is connected with "interactive preannotations" on; the annotator's drawn region goes
through Label Studio's interactive-annotating endpoint (what the labeling UI calls) to `/predict`.
"""

from __future__ import annotations

import pytest

from tests.conftest import region_tuples
from tests.fake_llm import entities_reply

pytestmark = pytest.mark.label_studio

TEXT = "Ada met Babbage in London. Later Ada wrote notes; Babbage read them in London."
DRAWN = {
    "id": "drawn1",
    "from_name": "label",
    "to_name": "text",
    "type": "labels",
    "origin": "manual",
    "value": {"start": 0, "end": 3, "text": "Ada", "labels": ["PER"]},
}


def test_a_drawn_region_is_propagated_and_completed_without_touching_the_region(label_studio, connected_project, llm):
    # The LLM labels Babbage and London, and (wrongly) calls a later "Ada" an ORG: the mark must win.
    llm.replies.append(entities_reply([("Ada", "PER"), ("Babbage", "PER"), ("London", "LOC"), ("Ada", "ORG"), ("Babbage", "PER"), ("London", "LOC")]))
    project = connected_project([TEXT], title="interactive", interactive=True)
    ml = project.ml
    (task,) = project.tasks()

    response = label_studio.api(
        "POST", f"/api/ml/{ml.id}/interactive-annotating", json={"task": task.id, "context": {"result": [DRAWN]}}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert "errors" not in answer, answer
    regions = answer["data"]["result"]
    assert sorted(region_tuples(regions, "start", "text", "label")) == [
        (8, "Babbage", "PER"), (19, "London", "LOC"), (33, "Ada", "PER"), (50, "Babbage", "PER"), (71, "London", "LOC"),
    ]
    # the drawn region is not echoed (the editor already has it) and nothing contradicts it
    assert all(r["value"]["start"] != 0 for r in regions)
    # Label Studio passes the answer to the editor and stores nothing for interactive calls
    assert project.predictions(task.id) == []
    # the mark reached the LLM as a constraint
    assert '"Ada" is PER' in llm.requests[0]["messages"][0]["content"]

    # the SDK's method reaches the same endpoint without error
    project.ls.ml.predict_interactive(id=ml.id, task=task.id, context={"result": [DRAWN]})
