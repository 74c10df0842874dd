"""Retries of the LLM engine, driven through /predict against fault injection in the fake LLM server."""

from __future__ import annotations

import functools
import logging
import time

import pytest
from prometheus_client import REGISTRY

from tests.conftest import predict_texts
from tests.fake_llm import Reply, entities_reply
from tests.processes import TEST_API_KEY


@pytest.fixture
def make_client(make_client):
    return functools.partial(make_client, llm_cache=False)


def predict(client, texts):
    """Each task's entity texts; None for a task /predict left unanswered (`[]`: asked again later)."""
    return [None if entry == [] else [r["value"]["text"] for r in entry["result"]] for entry in predict_texts(client, texts)]


def metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_429_is_retried_after_the_delay_in_retry_after(make_client, llm):
    before = metric("llm_ner_llm_retries_total", error_class="rate_limit")
    llm.replies.extend([Reply(status=429, headers={"Retry-After": "1"}), entities_reply([("Oslo", "LOC")])])
    assert predict(make_client(), ["Oslo."]) == [["Oslo"]]
    assert len(llm.requests) == 2
    assert llm.request_times[1] - llm.request_times[0] >= 0.95
    assert metric("llm_ner_llm_retries_total", error_class="rate_limit") == before + 1


@pytest.mark.parametrize(
    "fault, error_class",
    [
        (Reply(status=500), "server"),
        (Reply(status=503), "server"),
        (Reply(close_connection=True), "connection"),
        (Reply(raw_body=b'{"id": "chatcmpl-1", "choices": [{"index": 0, "mess'), "bad_response"),
    ],
    ids=["500", "503", "connection-dropped", "truncated-json"],
)
def test_transient_faults_are_retried_and_counted(make_client, llm, fault, error_class):
    before = metric("llm_ner_llm_retries_total", error_class=error_class)
    llm.replies.extend([fault, fault, entities_reply([("Oslo", "LOC")])])
    assert predict(make_client(), ["Oslo."]) == [["Oslo"]]
    assert len(llm.requests) == 3
    assert metric("llm_ner_llm_retries_total", error_class=error_class) == before + 2


def test_a_timeout_mid_request_is_retried(make_client, llm):
    llm.replies.extend([Reply(delay=3, content='{"entities": []}'), entities_reply([("Oslo", "LOC")])])
    started = time.monotonic()
    assert predict(make_client(llm_timeout=0.5), ["Oslo."]) == [["Oslo"]]
    assert time.monotonic() - started < 2.5
    assert len(llm.requests) == 2


@pytest.mark.parametrize(
    "status, error_class, words",
    [(400, "bad_request", "HTTP 400"), (401, "auth", "OPENAI_API_KEY"), (403, "permission", "HTTP 403"), (404, "not_found", "LLM_MODEL")],
)
def test_client_errors_fail_at_once_with_a_clear_log_line(make_client, llm, caplog, status, error_class, words):
    before = metric("llm_ner_llm_errors_total", error_class=error_class)
    llm.responder = lambda body: Reply(status=status, error_message=f"Incorrect API key provided: {TEST_API_KEY[:8]}***")
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    assert predict(make_client(), ["Oslo.", "Rome."]) == [None, None]
    assert time.monotonic() - started < 1.0
    assert len(llm.requests) == 2  # one try per task, no retry
    assert metric("llm_ner_llm_errors_total", error_class=error_class) == before + 2
    failures = [r.getMessage() for r in caplog.records if "LLM call failed" in r.getMessage()]
    assert failures and all(f"({error_class}, not retried)" in line and words in line for line in failures)
    assert TEST_API_KEY not in caplog.text and TEST_API_KEY[:8] not in caplog.text


def test_retries_stop_after_llm_max_retries(make_client, llm):
    llm.responder = lambda body: Reply(status=502)
    assert predict(make_client(llm_max_retries=2), ["Oslo."]) == [None]
    assert len(llm.requests) == 3


def test_backoff_is_exponential_with_full_jitter_and_a_cap(settings):
    from backend.llm.client import LLMClient

    client = LLMClient(settings.model_copy(update={"llm_retry_base": 0.5, "llm_retry_cap": 4.0}))
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        delays = [client.backoff(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.7 * ceiling and min(delays) < 0.3 * ceiling  # spread out, not one fixed step


def test_a_deadline_with_calls_in_flight_answers_every_task_in_order(make_client, llm):
    llm.gazetteer = {"Oslo": "LOC", "Rome": "LOC"}
    llm.responder = lambda body: Reply(delay=10) if "Slow" in body["messages"][-1]["content"] else llm.gazetteer_reply(body)
    started = time.monotonic()
    result = predict(make_client(predict_deadline=1.5), ["Oslo.", "Slow Rome.", "Rome."])
    elapsed = time.monotonic() - started
    assert result == [["Oslo"], None, ["Rome"]]
    assert elapsed < 3.0


def test_a_retry_after_beyond_the_deadline_fails_the_task_without_waiting(make_client, llm):
    llm.replies.append(Reply(status=429, headers={"Retry-After": "30"}))
    started = time.monotonic()
    assert predict(make_client(predict_deadline=5), ["Oslo."]) == [None]
    assert time.monotonic() - started < 2.0
    assert len(llm.requests) == 1


def test_requests_per_minute_limit_is_enforced_and_never_overruns_the_deadline(make_client, llm):
    llm.gazetteer = {"Oslo": "LOC"}
    started = time.monotonic()
    result = predict(make_client(llm_rpm=2, predict_deadline=2, predict_concurrency=1), ["Oslo 1.", "Oslo 2.", "Oslo 3."])
    assert time.monotonic() - started < 3.5
    assert result == [["Oslo"], ["Oslo"], None]
    assert len(llm.requests) == 2


def test_tokens_per_minute_limit_counts_the_usage_the_api_reports(make_client, llm):
    llm.gazetteer = {"Oslo": "LOC"}
    # each call reports ~200 prompt tokens (the fake: chars / 4): a 300-token budget fits one call a minute
    result = predict(make_client(llm_tpm=300, llm_max_tokens=16, predict_deadline=2, predict_concurrency=1), ["Oslo 1.", "Oslo 2."])
    assert result == [["Oslo"], None]
    assert len(llm.requests) == 1
