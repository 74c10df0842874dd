"""Bounded concurrency across the tasks of one /predict, and what the deadline leaves behind."""

from __future__ import annotations

import logging

from tests.conftest import predict, region_tuples_per_task
from tests.fake_llm import Reply


def test_llm_calls_in_flight_never_exceed_predict_concurrency_and_reach_it(make_client, llm):
    llm.gazetteer = {"Oslo": "LOC"}
    llm.latency = 0.3  # long enough for the calls to overlap at the fake: four in flight at once, never five
    answer = predict(make_client(predict_concurrency=4), [f"Oslo {i}." for i in range(20)])
    assert llm.peak_in_flight == 4
    assert region_tuples_per_task(answer, "text") == [["Oslo"]] * 20


def test_tasks_cut_by_the_deadline_are_logged_with_their_ids(make_client, llm, caplog):
    llm.gazetteer = {"Oslo": "LOC"}
    llm.responder = lambda body: Reply(delay=5) if "late" in body["messages"][-1]["content"] else llm.gazetteer_reply(body)
    caplog.set_level(logging.WARNING)
    answer = predict(make_client(predict_deadline=1), ["Oslo.", "late Oslo.", "Oslo again.", "late too."])
    assert region_tuples_per_task(answer, "text") == [["Oslo"], None, ["Oslo"], None]  # cut tasks: unanswered, asked again later
    cut = [r.getMessage() for r in caplog.records if "no pre-labels" in r.getMessage()]
    assert any(line.startswith("task 2:") for line in cut) and any(line.startswith("task 4:") for line in cut)
