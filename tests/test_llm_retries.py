"""Retries of the LLM engine, driven through /predict against fault injection in the fake LLM server.

The waits the engine decides on (backoff, Retry-After, room in the rate limit window) go through the
clock and sleep it accepts: a test reads what was waited instead of timing it, and waits for nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest

from tests.conftest import metric, predict, region_tuples_per_task
from tests.fake_llm import Reply, entities_reply
from tests.processes import TEST_API_KEY


class FakeClock:
    """A monotonic clock that moves only when slept: every sleep is recorded and returns at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_client(make_settings, clock):
    """A test client of a new app whose LLM client waits on `clock`; no response cache, every task reaches the LLM."""
    from backend.llm.client import LLMClient
    from backend.llm.ratelimit import RateLimiter
    from backend.protocol.server import create_app
    from backend.protocol.services import Services

    def make(**overrides):
        settings = make_settings(llm_cache=False, **overrides)
        llm = LLMClient(settings, sleep=clock.sleep)
        llm.limiter = RateLimiter(settings.llm_rpm, settings.llm_tpm, clock=clock, sleep=clock.sleep)
        services = dataclasses.replace(Services.from_settings(settings), llm=llm)
        return create_app(settings, services=services).test_client()

    return make


def test_429_is_retried_after_the_delay_in_retry_after(make_client, llm, clock):
    before = metric("llm_ner_llm_retries_total", error_class="rate_limit")
    llm.replies.extend([Reply(status=429, headers={"Retry-After": "1"}), entities_reply([("Oslo", "LOC")])])
    assert region_tuples_per_task(predict(make_client(), ["Oslo."]), "text") == [["Oslo"]]
    assert len(llm.requests) == 2
    assert clock.sleeps == [1.0]
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
def test_transient_faults_are_retried_and_counted(make_client, llm, clock, fault, error_class):
    before = metric("llm_ner_llm_retries_total", error_class=error_class)
    llm.replies.extend([fault, fault, entities_reply([("Oslo", "LOC")])])
    assert region_tuples_per_task(predict(make_client(), ["Oslo."]), "text") == [["Oslo"]]
    assert len(llm.requests) == 3
    assert len(clock.sleeps) == 2  # a backoff before each retry
    assert metric("llm_ner_llm_retries_total", error_class=error_class) == before + 2


def test_a_timeout_mid_request_is_retried(make_client, llm):
    llm.replies.extend([Reply(delay=60, content='{"entities": []}'), entities_reply([("Oslo", "LOC")])])
    started = time.monotonic()
    assert region_tuples_per_task(predict(make_client(llm_timeout=0.5), ["Oslo."]), "text") == [["Oslo"]]
    assert time.monotonic() - started < 30  # cut at LLM_TIMEOUT, not after the 60 s answer
    assert len(llm.requests) == 2


@pytest.mark.parametrize(
    "status, error_class, words",
    [(400, "bad_request", "HTTP 400"), (401, "auth", "OPENAI_API_KEY"), (403, "permission", "HTTP 403"), (404, "not_found", "LLM_MODEL")],
)
def test_client_errors_fail_at_once_with_a_clear_log_line(make_client, llm, clock, caplog, status, error_class, words):
    before = metric("llm_ner_llm_errors_total", error_class=error_class)
    llm.responder = lambda body: Reply(status=status, error_message=f"Incorrect API key provided: {TEST_API_KEY}")
    caplog.set_level(logging.INFO)
    assert region_tuples_per_task(predict(make_client(), ["Oslo.", "Rome."]), "text") == [None, None]  # unanswered: asked again later
    assert len(llm.requests) == 2 and clock.sleeps == []  # one try per task, no retry, no wait
    assert metric("llm_ner_llm_errors_total", error_class=error_class) == before + 2
    failures = [r.getMessage() for r in caplog.records if "LLM call failed" in r.getMessage()]
    assert failures and all(f"({error_class}, not retried)" in line and words in line for line in failures)
    assert TEST_API_KEY not in caplog.text


def test_retries_stop_after_llm_max_retries(make_client, llm, clock):
    llm.responder = lambda body: Reply(status=502)
    assert region_tuples_per_task(predict(make_client(llm_max_retries=2), ["Oslo."]), "text") == [None]
    assert len(llm.requests) == 3 and len(clock.sleeps) == 2


def test_backoff_is_exponential_with_full_jitter_and_a_cap(settings):
    from backend.llm.client import LLMClient

    client = LLMClient(settings.model_copy(update={"llm_retry_base": 0.5, "llm_retry_cap": 4.0}))
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        delays = [client.backoff(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.7 * ceiling and min(delays) < 0.3 * ceiling  # spread out, not one fixed step


def test_a_deadline_with_calls_in_flight_answers_every_task_in_order(make_client, llm):
    llm.gazetteer = {"Oslo": "LOC", "Rome": "LOC"}
    # 20 s: far beyond the deadline, and within the 30 s the kept task has to end after the test
    llm.responder = lambda body: Reply(delay=20) if "Slow" in body["messages"][-1]["content"] else llm.gazetteer_reply(body)
    client = make_client(predict_deadline=1.5)
    started = time.monotonic()
    result = region_tuples_per_task(predict(client, ["Oslo.", "Slow Rome.", "Rome."]), "text")
    elapsed = time.monotonic() - started
    assert result == [["Oslo"], None, ["Rome"]]
    assert elapsed < 15  # at the deadline, not after the 20 s answer


# With PREDICT_BACKLOG=0 a task the deadline cuts is dropped, so no wait or call that cannot finish
# in time is even started. (With a backlog, the default, cut tasks run on: tests/test_backlog.py.)
def test_a_retry_after_beyond_the_deadline_fails_the_task_without_waiting(make_client, llm, clock):
    llm.replies.append(Reply(status=429, headers={"Retry-After": "30"}))
    assert region_tuples_per_task(predict(make_client(predict_deadline=5, predict_backlog=0), ["Oslo."]), "text") == [None]
    assert clock.sleeps == []
    assert len(llm.requests) == 1


def test_requests_per_minute_limit_is_enforced_and_never_overruns_the_deadline(make_client, llm, clock):
    llm.gazetteer = {"Oslo": "LOC"}
    client = make_client(llm_rpm=2, predict_deadline=2, predict_concurrency=1, predict_backlog=0)
    result = region_tuples_per_task(predict(client, ["Oslo 1.", "Oslo 2.", "Oslo 3."]), "text")
    assert result == [["Oslo"], ["Oslo"], None]
    assert len(llm.requests) == 2
    assert clock.sleeps == []  # the window frees up in 60 s, past the 2 s deadline: no wait at all


def test_a_call_over_the_requests_per_minute_limit_waits_for_room_when_the_deadline_allows(make_client, llm, clock):
    llm.gazetteer = {"Oslo": "LOC"}
    client = make_client(llm_rpm=2, predict_deadline=80, predict_concurrency=1)
    result = region_tuples_per_task(predict(client, ["Oslo 1.", "Oslo 2.", "Oslo 3."]), "text")
    assert result == [["Oslo"], ["Oslo"], ["Oslo"]]
    (waited,) = clock.sleeps
    assert 60 <= waited < 61  # until the first call leaves the 60 s window


def test_tokens_per_minute_limit_counts_the_usage_the_api_reports(make_client, llm, clock):
    llm.gazetteer = {"Oslo": "LOC"}
    # each call reports ~200 prompt tokens (the fake: chars / 4): a 300-token budget fits one call a minute
    client = make_client(llm_tpm=300, llm_max_tokens=16, predict_deadline=2, predict_concurrency=1, predict_backlog=0)
    result = region_tuples_per_task(predict(client, ["Oslo 1.", "Oslo 2."]), "text")
    assert result == [["Oslo"], None]
    assert len(llm.requests) == 1 and clock.sleeps == []
