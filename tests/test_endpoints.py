"""Real OpenAI-compatible servers differ: each behaviour of llama-cpp-python's server (and the like),
played by the fake, and what the backend does about it: the capability probe, format fallbacks of
any status, truncated answers, sized max_tokens, timeouts, abandoned requests, adaptive concurrency."""

from __future__ import annotations

import json
import logging
import math
import time

import pytest

from backend.infra.usage import UsageLedger
from backend.llm.client import ANSWER_TOKENS_BASE, ANSWER_TOKENS_PER_CHAR, LLMClient
from backend.llm.probe import Plan, cached_probe, probe, probe_for
from backend.llm.ratelimit import ConcurrencyGate, GateTimeout
from tests.conftest import predict, region_tuples, region_tuples_per_task
from tests.fake_llm import Reply, entities_reply
from tests.processes import wait_until


def response_formats(requests) -> list[str | None]:
    """json_schema / json_object_schema / json_object / None (text), per request."""
    out = []
    for body in requests:
        fmt = body.get("response_format")
        out.append(None if fmt is None else "json_object_schema" if "schema" in fmt and fmt["type"] == "json_object" else fmt["type"])
    return out


# ---- the probe ----
def test_the_probe_finds_what_a_llama_cpp_python_server_does(make_settings, llm):
    llm.behave_like_llama_cpp_python()
    llm.latency = 0.2  # one at a time: a burst of 8 is answered in 8 waves
    caps = probe(LLMClient(make_settings()), Plan.everything())
    assert [(f.mode, f.works) for f in caps.forms] == [
        ("json_schema", False), ("json_object_schema", True), ("json_object", True), ("text", True)
    ]
    assert "HTTP 500" in caps.forms[0].detail and caps.mode == "json_object_schema"
    assert caps.logprobs is True  # asked with top_logprobs: 0, without which this server returns none
    assert all(body.get("top_logprobs") == 0 for body in llm.requests if body.get("logprobs"))
    assert caps.n is False
    assert caps.concurrency == 1
    assert caps.seconds_per_token is not None and caps.latency >= 0.2


@pytest.mark.parametrize("served_at_once, expected", [(0, 8), (2, 2)])
def test_the_concurrency_probe_measures_how_many_requests_run_at_once(make_settings, llm, served_at_once, expected):
    llm.max_concurrency = served_at_once  # 0: no limit
    llm.latency = 0.25
    caps = probe(LLMClient(make_settings()), Plan(burst=8))
    assert caps.concurrency == expected
    assert caps.mode == "json_schema" and caps.logprobs is False  # the gazetteer answers carry no logprobs


def test_the_probe_fails_clearly_on_an_unreachable_endpoint_and_a_refused_key(make_settings, llm):
    from backend.llm.probe import ProbeFailed

    with pytest.raises(ProbeFailed, match="could not connect"):
        probe(LLMClient(make_settings(openai_base_url="http://127.0.0.1:9/v1", llm_timeout=2)), Plan())
    llm.responder = lambda body: Reply(status=401, error_message="Incorrect API key provided: test-ope***")
    with pytest.raises(ProbeFailed, match="OPENAI_API_KEY"):
        probe(LLMClient(make_settings()), Plan())


def test_workers_of_one_model_dir_share_one_probe_and_log_it_once(make_settings, llm, caplog):
    llm.behave_like_llama_cpp_python()
    caplog.set_level(logging.INFO)
    settings = make_settings(llm_probe=True)
    first, second = LLMClient(settings, prober=probe_for), LLMClient(settings, prober=probe_for)
    assert first.prepare().mode == "json_object_schema"
    asked = len(llm.requests)
    assert second.prepare().to_json() == first.capabilities.to_json()
    assert len(llm.requests) == asked  # the second worker asked nothing
    probe_lines = [r.getMessage() for r in caplog.records if r.name == "backend.llm.probe" and r.levelno == logging.INFO]
    assert len(probe_lines) == 1 and "json_object with a schema" in probe_lines[0]


def test_settings_override_the_probe(make_settings, llm):
    llm.behave_like_llama_cpp_python()
    client = LLMClient(make_settings(llm_probe=True, llm_structured_output="json_object", predict_concurrency=3, llm_logprobs=False),
                       prober=probe_for)
    caps = client.prepare()
    assert response_formats(llm.requests) == ["json_object"]  # one form, no burst, no n
    assert not any(body.get("logprobs") for body in llm.requests)
    assert caps.concurrency is None and client.concurrency == 3 and client.mode == "json_object"


# ---- a server like llama-cpp-python's, with the backend's defaults ----
def test_with_default_settings_every_task_is_answered_with_scores_by_a_llama_cpp_python_like_server(make_client, llm, caplog):
    llm.behave_like_llama_cpp_python()
    llm.gazetteer = {"Oslo": "LOC", "Ada Lovelace": "PER"}
    caplog.set_level(logging.INFO)
    client = make_client(llm_probe=True)  # everything else as shipped
    texts = ["Ada Lovelace visited Oslo.", "Oslo again.", "Nothing here.", "Ada Lovelace."]
    answer = predict(client, texts)
    assert region_tuples_per_task(answer, "text") == [["Ada Lovelace", "Oslo"], ["Oslo"], [], ["Ada Lovelace"]]
    assert all("score" in region for entry in answer["results"] for region in entry["result"])
    work = [body for body in llm.requests if "<text>" in body["messages"][-1]["content"]]
    assert len(work) == 4  # one call a task: no 500 retried, no fallback repeated
    assert response_formats(work) == ["json_object_schema"] * 4
    assert all(body["logprobs"] is True and body["top_logprobs"] == 0 for body in work)
    assert llm.peak_in_flight == 1
    predict(client, ["Oslo, once more."])
    assert sum(r.name == "backend.llm.probe" for r in caplog.records) == 1  # probed and logged once


def test_json_schema_refused_with_a_500_falls_back_at_once_without_a_probe(make_client, llm):
    llm.reject_json_schema = True
    llm.format_error_status = 500
    llm.gazetteer = {"Oslo": "LOC"}
    client = make_client()
    assert region_tuples_per_task(predict(client, ["Oslo."]), "text") == [["Oslo"]]
    assert response_formats(llm.requests) == ["json_schema", "json_object_schema"]  # the 500 was not retried
    predict(client, ["Oslo again."])
    assert response_formats(llm.requests)[2:] == ["json_object_schema"]  # remembered


def test_a_500_about_something_else_is_still_retried(make_client, llm):
    llm.replies.extend([Reply(status=500, error_message="CUDA out of memory"), entities_reply([("Oslo", "LOC")])])
    assert region_tuples_per_task(predict(make_client(), ["Oslo."]), "text") == [["Oslo"]]
    assert response_formats(llm.requests) == ["json_schema", "json_schema"]


# ---- answers ----
def test_max_tokens_is_sized_from_the_text(make_client, llm):
    llm.gazetteer = {"Oslo": "LOC"}
    short, long = "Oslo is cold.", "Oslo. " * 2000
    predict(make_client(), [short, long])
    sizes = {body["messages"][-1]["content"].count("Oslo"): body["max_tokens"] for body in llm.requests}
    assert sizes[1] == ANSWER_TOKENS_BASE + ANSWER_TOKENS_PER_CHAR * len(short) < 200
    assert sizes[2000] == 2048  # LLM_MAX_TOKENS caps it


def test_a_runaway_answer_stops_at_the_sized_max_tokens_is_called_truncated_and_not_repeated(make_client, llm, caplog):
    llm.enforce_max_tokens = True
    runaway = '{"entities": [{"text": "' + "<unk>" * 5000
    llm.replies.extend([Reply(content=runaway), entities_reply([("Oslo", "LOC")])])
    caplog.set_level(logging.INFO)
    assert region_tuples_per_task(predict(make_client(), ["Oslo is cold."]), "text") == [["Oslo"]]
    first, second = llm.requests
    assert first["max_tokens"] < 100
    # asked again without the cut-off answer in the conversation
    assert [m["role"] for m in second["messages"]] == [m["role"] for m in first["messages"]] + ["user"]
    assert "<unk><unk>" not in json.dumps(second["messages"])
    assert any("truncated at max_tokens" in r.getMessage() for r in caplog.records)


def test_an_answer_truncated_twice_fails_the_task_saying_truncated(make_client, llm, caplog):
    llm.enforce_max_tokens = True
    llm.responder = lambda body: Reply(content='{"entities": [{"text": "' + "<label>" * 5000)
    caplog.set_level(logging.WARNING)
    answer = predict(make_client(), ["Oslo is cold."])
    assert region_tuples_per_task(answer, "text") == [None] and len(llm.requests) == 2
    failure = next(r.getMessage() for r in caplog.records if "no pre-labels" in r.getMessage())
    assert "truncated" in failure and "entities" not in failure


def test_a_deterministic_request_that_timed_out_is_sent_again_once_not_more(make_client, llm, caplog):
    llm.responder = lambda body: Reply(delay=1.5, content='{"entities": []}')
    caplog.set_level(logging.WARNING)
    answer = predict(make_client(llm_timeout=0.4, llm_max_retries=4), ["Oslo."])
    assert region_tuples_per_task(answer, "text") == [None] and len(llm.requests) == 2
    assert any("timed out twice" in r.getMessage() for r in caplog.records)


def test_requests_abandoned_at_the_deadline_are_closed_so_the_server_can_stop(make_client, llm):
    llm.gazetteer = {"Oslo": "LOC"}
    llm.responder = lambda body: Reply(delay=60) if "slow" in body["messages"][-1]["content"] else llm.gazetteer_reply(body)
    started = time.monotonic()
    # PREDICT_BACKLOG=0: work the deadline cuts is dropped (by default it runs on, and is kept)
    answer = predict(make_client(predict_deadline=1, predict_backlog=0), ["Oslo.", "slow Oslo."])
    assert region_tuples_per_task(answer, "text") == [["Oslo"], None]
    # the fake sees the client hang up at the deadline, not after LLM_TIMEOUT (60 s) or the 60 s answer
    # (bounds far from both, that a loaded machine meets)
    assert wait_until(lambda: llm.disconnects, timeout=25.0)
    assert time.monotonic() - started < 30
    assert len(llm.requests) == 2  # and it was not sent again


# ---- concurrency ----
def test_with_the_probes_figure_queueing_stays_on_our_side_and_no_request_times_out(make_client, llm):
    # a server running one request at a time, 0.3 s each: 6 sent at once would wait 1.8 s there,
    # past LLM_TIMEOUT=1; with the probe's figure they queue here, outside their timeouts
    llm.gazetteer = {"Oslo": "LOC"}
    llm.max_concurrency, llm.latency = 1, 0.3
    answer = predict(make_client(llm_probe=True, llm_timeout=1.0), [f"Oslo {i}." for i in range(6)])
    assert region_tuples_per_task(answer, "text") == [["Oslo"]] * 6
    work = [body for body in llm.requests if "<text>" in body["messages"][-1]["content"]]
    assert len(work) == 6 and llm.disconnects == []  # nothing timed out, nothing was sent twice


def test_concurrency_comes_down_to_what_the_endpoint_sustains(make_client, llm, caplog):
    # PREDICT_CONCURRENCY=8 against a server running one request at a time, 0.25 s each, LLM_TIMEOUT=0.9:
    # the first wave overloads it (some tasks of that request may fail), then fewer are sent
    llm.gazetteer = {"Oslo": "LOC"}
    llm.max_concurrency, llm.latency = 1, 0.25
    caplog.set_level(logging.INFO)
    client = make_client(predict_concurrency=8, llm_timeout=0.9, predict_deadline=30)
    predict(client, [f"Oslo {i}." for i in range(12)])
    assert any("LLM calls in flight lowered" in r.getMessage() for r in caplog.records)
    llm.reset()
    llm.gazetteer = {"Oslo": "LOC"}
    llm.max_concurrency, llm.latency = 1, 0.25
    answer = predict(client, [f"Rome {i}, Oslo." for i in range(8)])
    assert region_tuples_per_task(answer, "text") == [["Oslo"]] * 8
    assert len(llm.requests) == 8 and llm.disconnects == []  # no timeout, no retry


def test_the_gate_halves_once_per_congested_window_and_climbs_back_one_step_at_a_time():
    now = [0.0]
    gate = ConcurrencyGate(8, clock=lambda: now[0])
    slots = [gate.acquire() for _ in range(8)]
    now[0] = 1.0
    for slot in slots:  # eight timeouts of calls sent under the old limit: one halving, not three
        gate.release(slot, congested=True)
    assert gate.limit == 4
    for _ in range(4):
        now[0] += 1
        gate.release(gate.acquire(), congested=False)
    assert gate.limit == 5


def test_a_call_waits_for_a_slot_no_longer_than_its_deadline():
    gate = ConcurrencyGate(2)
    held = [gate.acquire(), gate.acquire()]
    started = time.monotonic()
    with pytest.raises(GateTimeout):
        gate.acquire(time_left=0.2)
    # at least the time allowed, and not forever (a loaded machine may wake the waiter late)
    assert 0.2 <= time.monotonic() - started < 10 and gate.in_flight == len(held)


def test_a_waiting_call_gets_the_slot_a_finished_call_frees():
    import threading

    gate = ConcurrencyGate(1)
    slot = gate.acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(gate.acquire(time_left=5)))
    waiter.start()
    time.sleep(0.1)
    assert got == []
    gate.release(slot, congested=False)
    waiter.join(2)
    assert len(got) == 1 and gate.in_flight == 1


# ---- n, scores, cost ----
@pytest.mark.parametrize("behaviour, first", [("ignore_n", [3, None, None]), ("reject_n", [3, None, None, None])])
def test_n_not_honoured_by_the_endpoint_is_made_up_by_one_request_per_sample(make_client, llm, caplog, behaviour, first):
    setattr(llm, behaviour, True)  # one answer whatever n (llama-cpp-python, Ollama), or a 400 (llama-server)
    llm.gazetteer = {"Oslo": "LOC"}
    caplog.set_level(logging.WARNING)
    client = make_client(llm_samples=3, llm_logprobs=False)
    (entry,) = predict(client, ["Oslo."])["results"]
    assert [body.get("n") for body in llm.requests] == first
    assert entry["result"][0]["score"] == 1.0  # three agreeing samples, not one
    predict(client, ["Oslo again."])
    assert [body.get("n") for body in llm.requests[len(first):]] == [None, None, None]
    assert sum("does not honour n" in r.getMessage() for r in caplog.records) == 1


def test_spans_matched_in_another_case_keep_their_score(make_client, llm):
    llm.auto_logprobs = -0.1
    llm.replies.append(entities_reply([("oslo", "LOC"), ("NORWAY", "LOC")]))
    (entry,) = predict(make_client(), ["Oslo is in Norway."])["results"]
    assert region_tuples(entry["result"], "text") == ["Oslo", "Norway"]
    assert all(0 < region["score"] < 1 for region in entry["result"])
    oslo = math.exp(-0.1 * 2)  # the tokens inside "oslo" and "LOC"
    assert entry["result"][0]["score"] == pytest.approx(oslo, abs=1e-3)


def test_the_cost_log_counts_the_calls_of_failed_tasks_too(make_client, llm, tmp_path):
    llm.gazetteer = {"Oslo": "LOC"}
    llm.responder = lambda body: Reply(content="no JSON here") if "Rome" in json.dumps(body["messages"]) else llm.gazetteer_reply(body)
    answer = predict(make_client(), ["Oslo.", "Rome."], project="5.1")
    assert region_tuples_per_task(answer, "text") == [["Oslo"], None]
    totals = UsageLedger.in_dir(tmp_path / "model").totals("5")
    assert totals["tasks"] == 2 and totals["calls"] == 3  # Oslo's call, and Rome's answer and its repair
    assert totals["prompt_tokens"] == sum(max(1, sum(len(m["content"]) for m in r["messages"]) // 4) for r in llm.requests)


def test_the_probe_makes_no_entry_in_the_cost_log(make_client, llm, tmp_path):
    llm.gazetteer = {"Oslo": "LOC"}
    predict(make_client(llm_probe=True), ["Oslo."], project="6.1")
    assert len(llm.requests) > 1
    assert UsageLedger.in_dir(tmp_path / "model").totals("6")["calls"] == 1


def test_a_cached_probe_is_reused_only_for_the_same_endpoint_model_and_plan(make_settings, llm):
    settings = make_settings()
    cached_probe(LLMClient(settings), Plan())
    asked = len(llm.requests)
    cached_probe(LLMClient(settings), Plan())
    assert len(llm.requests) == asked
    cached_probe(LLMClient(make_settings(llm_model="other-model")), Plan())
    assert len(llm.requests) > asked
