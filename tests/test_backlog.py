"""Work past the deadline is kept: tasks a /predict's deadline cuts are answered [] (Label Studio asks
again) and keep running in the background (PREDICT_BACKLOG); their answers reach the response cache
and, when the backend has Label Studio credentials, Label Studio itself."""

from __future__ import annotations

import pytest

from tests.conftest import gazetteer_spans, predict, region_tuples, region_tuples_per_task
from tests.fake_llm import Reply
from tests.processes import wait_until

GAZETTEER = {"Oslo": "LOC", "Ada Lovelace": "PER", "Rome": "LOC"}


def slow_when(llm, word: str, seconds: float):
    """The gazetteer's answers, `seconds` late for texts with `word`."""
    llm.gazetteer = dict(GAZETTEER)

    def answer(body):
        reply = llm.gazetteer_reply(body)
        reply.delay = seconds if word in body["messages"][-1]["content"] else 0.0
        return reply

    llm.responder = answer


def services_of(client):
    return client.application.extensions["llm_ner"]["services"]


def test_a_task_cut_by_the_deadline_keeps_running_and_the_next_ask_is_answered_from_the_cache(make_client, llm):
    slow_when(llm, "slow", 1.5)
    texts = ["Oslo.", "slow Ada Lovelace.", "Rome."]
    client = make_client(predict_deadline=0.5)
    first = predict(client, texts)
    assert region_tuples_per_task(first, "text") == [["Oslo"], None, ["Rome"]]
    assert wait_until(lambda: services_of(client).backlog.pending == 0, timeout=10)
    # another worker (a new app on the same MODEL_DIR): the late answer is in the shared cache
    asked = len(llm.requests)
    again = predict(make_client(predict_deadline=0.5), texts)
    assert region_tuples_per_task(again, "text") == [["Oslo"], ["Ada Lovelace"], ["Rome"]]
    assert len(llm.requests) == asked


def test_beyond_predict_backlog_a_cut_task_is_dropped_before_it_starts(make_client, llm):
    slow_when(llm, "slow", 1.0)
    client = make_client(predict_deadline=0.3, predict_concurrency=1, predict_backlog=1)
    first = predict(client, ["slow Oslo.", "slow Rome."])
    assert first["results"] == [[], []]
    assert wait_until(lambda: services_of(client).backlog.pending == 0, timeout=10)
    assert len(llm.requests) == 1  # the second never started: the backlog held one task




TEXTS = [f"Report {i}: Ada Lovelace wrote from Oslo to Rome." if i % 3 else f"Report {i}: nothing to see." for i in range(12)]


@pytest.mark.label_studio
def test_retrieve_predictions_larger_than_one_deadline_ends_with_every_task_pre_labeled(
    label_studio, backend_factory, connected_project, llm
):
    # 12 tasks, 1 s a call, 2 at a time, a 2 s deadline: one click answers about 4; the backend, holding
    # Label Studio credentials, writes the other 8 into Label Studio as they finish
    llm.gazetteer = dict(GAZETTEER)
    llm.latency, llm.max_concurrency = 1.0, 2
    backend = backend_factory(
        workers=1, PREDICT_DEADLINE="2", PREDICT_CONCURRENCY="2",
        LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token,
    )
    project = connected_project(TEXTS, title="backlog", backend=backend)
    version = project.model_version()
    label_studio.retrieve_predictions(project.id)
    tasks = project.tasks()

    def every_task_predicted():
        return all(project.predictions(t.id) for t in tasks)

    assert wait_until(every_task_predicted, timeout=60)
    for task in tasks:
        (prediction,) = project.predictions(task.id)  # exactly one, whoever delivered it
        assert prediction.model_version == version
        assert set(region_tuples(prediction.result, "start", "end", "label")) == gazetteer_spans(task.data["text"], GAZETTEER)
    # no empty prediction was stored for a task that has entities
    assert all(project.predictions(t.id)[0].result for t in tasks if "Oslo" in t.data["text"])
    assert len(llm.requests) == len(TEXTS)  # each text asked once


@pytest.mark.label_studio
def test_an_outage_stores_no_empty_prediction_and_tasks_are_pre_labeled_after_recovery(
    label_studio, backend_factory, connected_project, llm
):
    llm.gazetteer = dict(GAZETTEER)
    llm.responder = lambda body: Reply(status=500)
    backend = backend_factory(workers=1, LLM_MAX_RETRIES="0")
    project = connected_project(TEXTS[:3], title="outage", backend=backend)
    opened = project.open_next_task()
    assert project.predictions(opened["id"]) == []  # nothing stored: Label Studio will ask again
    llm.responder = None  # the provider recovers
    reopened = project.open_next_task()
    assert reopened["id"] == opened["id"]
    (prediction,) = project.predictions(opened["id"])
    assert set(region_tuples(prediction.result, "start", "end", "label")) == gazetteer_spans(opened["data"]["text"], GAZETTEER)
