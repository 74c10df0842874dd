"""Warm start: TASKS_CREATED pre-computes the new tasks' predictions, so opening them costs no LLM call."""

from __future__ import annotations

import base64
import threading

import pytest

from tests.conftest import NER_CONFIG, predict, region_tuples_per_task
from tests.processes import wait_until

AUTH = "Basic " + base64.b64encode(b"robot:warm-pass-0a1b").decode()


@pytest.fixture
def make_client(make_client):
    """Warm start acts only on an authenticated (or verified) webhook: these apps use basic auth, and
    their test client sends it with every request."""

    def make(**overrides):
        client = make_client(basic_auth_user="robot", basic_auth_pass="warm-pass-0a1b", **overrides)
        client.environ_base["HTTP_AUTHORIZATION"] = AUTH
        assert client.post("/setup", json={"project": "5", "schema": NER_CONFIG}).status_code == 200
        return client

    return make


TEXTS = ["Ada Lovelace lived in London.", "Paris is big.", "Nothing here."]


def tasks_created(texts, first_id=1):
    return {
        "action": "TASKS_CREATED",
        "tasks": [{"id": first_id + i, "data": {"text": t}, "project": 5} for i, t in enumerate(texts)],
        "project": {"id": 5, "label_config": NER_CONFIG, "title": "p"},
    }


def test_tasks_created_precomputes_predictions_so_predict_makes_no_llm_call(make_client, llm):
    llm.gazetteer = {"Ada Lovelace": "PER", "London": "LOC", "Paris": "LOC"}
    llm.latency = 5.0
    client = make_client(warm_start=True)
    response = client.post("/webhook", json=tasks_created(TEXTS))
    assert response.status_code == 201
    assert llm.reply_times == []  # answered before any LLM call finished (an order, not a clock)
    assert wait_until(lambda: not any(t.name == "warm-start" for t in threading.enumerate()) and len(llm.requests) == 3, 60.0, 0.05)
    predicted = predict(client, TEXTS, project="5.1")  # the same task ids and texts
    assert len(llm.requests) == 3  # all three came from the cache
    assert region_tuples_per_task(predicted, "text") == [["Ada Lovelace", "London"], ["Paris"], []]


def test_warm_start_is_off_by_default(make_client, llm):
    client = make_client()
    assert client.post("/webhook", json=tasks_created(TEXTS)).status_code == 201
    assert not any(t.name == "warm-start" for t in threading.enumerate())
    assert llm.requests == []


@pytest.mark.parametrize("tasks, field", [([{"id": 1}], "tasks[0]"), ([{"id": 1, "data": {}}, "junk"], "tasks[1]")])
def test_tasks_created_with_a_malformed_task_is_refused_naming_it_and_costs_nothing(make_client, llm, tasks, field):
    client = make_client(warm_start=True)
    payload = {"action": "TASKS_CREATED", "tasks": tasks, "project": {"id": 5, "label_config": NER_CONFIG}}
    response = client.post("/webhook", json=payload)
    assert response.status_code == 400
    assert field in response.get_data(as_text=True)
    assert not any(t.name == "warm-start" for t in threading.enumerate())
    assert llm.requests == []
