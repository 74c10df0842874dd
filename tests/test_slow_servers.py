"""Slow local servers (issue 27, item 4): a server like llama-cpp-python's runs one call at a time,
goes on generating an answer its client gave up on, and answers a prompt past its context window with
a 400. The probe waits for a slow first answer and, when it cannot finish, leaves one call at a time; a
timed-out call is not sent again behind the answer the server is still generating; an answer's calls
keep to its time budget; the context window is read (llama-server's /props, or the 400's words) and
texts are cut into chunks that fit; the doctor measures the window and says what to set.

Nothing here times anything: the tests count requests, requests open at once and 400s.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import Future

import pytest

from backend.llm.client import LLMClient
from backend.llm.probe import PROBE_MESSAGES, Plan, probe
from tests.conftest import predict, region_tuples_per_task, run_cli
from tests.fake_llm import Reply
from tests.processes import wait_until

PROBE_TEXT = PROBE_MESSAGES[-1]["content"]


def is_probe(body) -> bool:
    """A request of the capability probe (its pre-labeling request, or a short one of its burst)."""
    last = body["messages"][-1]["content"]
    return last == PROBE_TEXT or last.startswith("Request ")


def prompt_chars(body) -> int:
    return sum(len(m.get("content") or "") for m in body["messages"])


def too_long(llm, body) -> bool:
    """A request the fake answered with its context-length 400 (4 characters a token)."""
    return llm.context_tokens is not None and prompt_chars(body) // 4 >= llm.context_tokens


# ---- the probe ----
def test_the_probe_waits_for_a_slow_first_answer_and_its_figure_is_used(make_client, llm):
    """The probe's first request waited min(LLM_TIMEOUT, 30 s), so a server slower than that to answer
    its first request was never probed: 8 calls at once went to a server that runs one."""
    llm.behave_like_llama_cpp_python()
    llm.finish_abandoned = False  # nothing abandoned is left to slow the tasks down either way
    llm.latency = 0.25  # the burst's waves stand apart on a loaded machine
    llm.gazetteer = {"Oslo": "LOC"}
    first = [True]

    def answer(body):
        if is_probe(body) and first[0]:  # the first answer: a model loading, a grammar compiled
            first[0] = False
            return Reply(delay=1.0, content='{"entities": []}')
        return llm.gazetteer_reply(body)

    llm.responder = answer
    client = make_client(llm_probe=True, llm_timeout=0.6)  # the first answer may take 3 x LLM_TIMEOUT
    assert region_tuples_per_task(predict(client, ["Oslo."]), "text") == [["Oslo"]]
    llm.peak_open = 0  # the probe's burst sent several at once: what counts is what came after it
    answer_ = predict(client, [f"Oslo {i}." for i in range(6)], first_id=2)
    assert region_tuples_per_task(answer_, "text") == [["Oslo"]] * 6
    assert llm.peak_open == 1  # the probe's burst measured one at a time, and the tasks kept to it


def test_a_probe_that_cannot_finish_leaves_one_call_at_a_time(make_client, llm, caplog):
    """A probe that failed left 8 calls in flight at once: 7 to 10 of 12 tasks of a /predict timed out
    on a server that runs one."""
    llm.gazetteer = {"Oslo": "LOC"}
    # the probe's requests are never answered in time (the server is busy elsewhere); the tasks' are
    llm.responder = lambda body: Reply(delay=30) if is_probe(body) else llm.gazetteer_reply(body)
    caplog.set_level(logging.WARNING)
    client = make_client(llm_probe=True, llm_timeout=0.3)
    assert region_tuples_per_task(predict(client, ["Oslo."]), "text") == [["Oslo"]]
    llm.peak_open = 0  # from here on (the probe is tried again a minute later)
    answer = predict(client, [f"Oslo {i}." for i in range(6)], first_id=2)
    assert region_tuples_per_task(answer, "text") == [["Oslo"]] * 6
    work = [body for body in llm.requests if not is_probe(body)]
    assert len(work) == 7
    assert llm.peak_open == 1
    warning = next(r.getMessage() for r in caplog.records if "could not probe" in r.getMessage())
    assert "one LLM call at a time" in warning and "no answer to a short pre-labeling request within 0.9 s" in warning


# ---- time budgets ----
def test_a_timed_out_call_to_a_one_at_a_time_server_is_not_sent_again_behind_it(make_client, llm, caplog):
    """llama-cpp-python goes on generating an answer whose client left: the same request sent again
    waited behind it, then took as long itself (2 x LLM_TIMEOUT a try)."""
    llm.behave_like_llama_cpp_python()
    llm.gazetteer = {"Oslo": "LOC"}
    llm.responder = lambda body: Reply(delay=1.5, content='{"entities": []}') if "slow" in body["messages"][-1]["content"] else llm.gazetteer_reply(body)
    caplog.set_level(logging.WARNING)
    client = make_client(predict_concurrency=1, llm_timeout=0.4, llm_structured_output="json_object_schema")
    assert region_tuples_per_task(predict(client, ["slow Oslo."]), "text") == [None]
    assert len(llm.requests) == 1
    assert any("is not sent again" in r.getMessage() for r in caplog.records)
    assert wait_until(lambda: llm.finished_abandoned == 1, timeout=30)  # the server generated it anyway
    assert region_tuples_per_task(predict(client, ["Oslo."], first_id=2), "text") == [["Oslo"]]


def test_the_retries_of_an_answer_keep_to_its_time_budget(make_client, llm):
    """Retries of timed-out calls (samples at a temperature: not deterministic) went on for
    LLM_MAX_RETRIES + 1 tries of LLM_TIMEOUT each, whatever they added up to."""
    llm.responder = lambda body: Reply(delay=5, content='{"entities": []}')
    client = make_client(llm_timeout=0.3, llm_task_timeout=0.7, llm_max_retries=6, llm_samples=2, llm_logprobs=False)
    answer = predict(client, ["Oslo."])
    assert region_tuples_per_task(answer, "text") == [None]
    assert 1 <= len(llm.requests) <= 3  # 0.3 + 0.3 + what is left of 0.7; without the budget, 7 tries


@pytest.mark.parametrize("error_class, tried_again", [("timeout", False), ("context_length", False), ("deadline", False),
                                                      ("connection", True), ("server", True)])
def test_a_job_tries_a_task_again_after_an_outage_not_after_it_ran_out_of_time(error_class, tried_again):
    """A job tried a task that timed out twice more (3 tries x 2 calls x LLM_TIMEOUT: 6 minutes)."""
    from backend.llm.client import LLMCallFailed
    from backend.pipeline.jobs.tries import collect_tries

    failed: Future = Future()
    failed.set_exception(LLMCallFailed("it failed", error_class))
    in_flight = {failed: ({"id": 7}, 0)}
    asked: list[int] = []
    failures: dict[int, str] = {}
    collect_tries(in_flight, failures, lambda usages: None, lambda task, attempt: asked.append(attempt))
    assert (asked == [1]) is tried_again
    assert failures[7].startswith(f"llm_{error_class}: it failed")


# ---- the context window ----
def long_text(words: int) -> str:
    """A long document: a sentence naming Oslo, then filler sentences, Bergen at the very end."""
    return "Oslo is the capital. " + "The committee met again and talked for a long while. " * words + "Then came Bergen."


def test_a_text_past_the_context_window_is_chunked_to_it_and_the_400_is_not_sent_again(make_client, llm, caplog):
    """llama-cpp-python's default 2,048-token window failed Wikigold documents with a 400, which was
    not understood: the task failed (a job tried it twice more, identically) and nothing said why."""
    llm.behave_like_llama_cpp_python()  # a 2,048-token window; no /props
    llm.gazetteer = {"Oslo": "LOC", "Bergen": "LOC"}
    caplog.set_level(logging.INFO)
    client = make_client(predict_deadline=60)  # LLM_CONTEXT_CHARS=12,000: ~3,000 tokens of text
    text = long_text(300)  # ~16,000 characters
    assert region_tuples_per_task(predict(client, [text]), "text") == [["Oslo", "Bergen"]]
    refused = [body for body in llm.requests if too_long(llm, body)]
    assert len(refused) == 1  # the first chunk; nothing sent again as it was
    assert sum(too_long(llm, b) for b in llm.requests if prompt_chars(b) == prompt_chars(refused[0])) == 1
    assert any("context window (2048 tokens)" in r.getMessage() for r in caplog.records)
    asked = len(llm.requests)
    # the next long text is cut to the window from the start
    assert region_tuples_per_task(predict(client, [long_text(280)], first_id=2), "text") == [["Oslo", "Bergen"]]
    assert not any(too_long(llm, body) for body in llm.requests[asked:])


def test_llama_servers_props_size_the_chunks_before_any_400(make_client, llm):
    llm.behave_like_llama_server(n_ctx=1024, slots=2)
    llm.gazetteer = {"Oslo": "LOC", "Bergen": "LOC"}
    client = make_client(llm_probe=True, predict_deadline=60)
    assert region_tuples_per_task(predict(client, [long_text(120)]), "text") == [["Oslo", "Bergen"]]
    assert not any(too_long(llm, body) for body in llm.requests)
    assert llm.peak_open <= 2  # total_slots: the concurrency, no burst needed


def test_a_prompt_whose_answer_does_not_fit_is_asked_again_with_a_smaller_max_tokens(make_client, llm):
    """OpenAI and vLLM count max_tokens into the window: a prompt that fits is asked again with the
    answer the window leaves, never as it was."""
    llm.gazetteer = {"Oslo": "LOC"}
    window = 600

    def openai_like(body):
        prompt = prompt_chars(body) // 4
        if prompt + body["max_tokens"] > window:
            return Reply(status=400, error_message=(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt + body['max_tokens']} tokens ({prompt} in the messages, {body['max_tokens']} in the completion). "
                "Please reduce the length of the messages or completion."), error_extra={"code": "context_length_exceeded"})
        return llm.gazetteer_reply(body)

    llm.responder = openai_like
    text = "Oslo. " + "A quiet day in the city. " * 40
    assert region_tuples_per_task(predict(make_client(), [text]), "text") == [["Oslo"]]
    first, second = llm.requests
    assert first["messages"] == second["messages"] and second["max_tokens"] < first["max_tokens"]
    assert prompt_chars(second) // 4 + second["max_tokens"] == window


# ---- the doctor ----
def test_the_doctor_measures_the_context_window_and_recommends_llm_context_chars(llm, tmp_path):
    """`doctor` did not measure the context window, and cut its json_schema line inside a quotation."""
    llm.behave_like_llama_cpp_python()
    done = run_cli(llm, "doctor", LLM_MODEL="fake-model")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    line = next(line for line in out.splitlines() if line.strip().startswith("json_schema"))
    assert line.rstrip().endswith("rejected: HTTP 500 from the LLM endpoint: Input should be 'text' or 'json_object' (body.response_format.type)")
    assert re.search(r"context window\s+2048 tokens \(a prompt of \d+ characters \(\d+ tokens\), the backend's longest, was refused", out)
    chars = int(re.search(r"LLM_CONTEXT_CHARS=(\d+)", out).group(1))
    assert 200 <= chars < 12_000
    # what it recommends fits: a request with a text that long (and no examples) is answered
    overlap = re.search(r"LLM_CHUNK_OVERLAP=(\d+)", out)
    assert overlap is None or int(overlap.group(1)) * 2 <= chars


def test_the_clients_window_comes_from_a_400_in_llama_servers_words(make_settings, llm):
    llm.behave_like_llama_server(n_ctx=512)
    llm.props = False  # a llama-server behind a proxy that passes /v1 only
    caps = probe(LLMClient(make_settings()), Plan(context=True))
    assert caps.context_tokens == 512 and "was refused as too long" in caps.context
    assert caps.chars_per_token == pytest.approx(4.0, rel=0.01)  # the fake's 4 characters a token


@pytest.mark.parametrize(("num_ctx", "server_context", "ps_context", "window", "source"), [
    (None, 1536, True, 1536, "/api/ps"),  # OLLAMA_CONTEXT_LENGTH, listed by /api/ps once loaded
    (1024, None, False, 1024, "/api/show: the model's num_ctx"),  # an Ollama whose /api/ps lists no window
    (None, None, False, 2048, "/api/show: no num_ctx"),
])
def test_ollamas_window_sizes_the_chunks_it_would_cut_silently(
    make_client, make_settings, llm, num_ctx, server_context, ps_context, window, source
):
    """Ollama answers a prompt past its window without an error, its beginning cut off: Oslo, at the
    start of a long text, was lost without a word. The probe reads the window Ollama runs the model
    with (/api/ps), else the model's num_ctx (/api/show), else assumes Ollama's smallest default,
    and the chunks fit it."""
    llm.behave_like_ollama(num_ctx=num_ctx, server_context=server_context, ps_context=ps_context)
    llm.gazetteer = {"Oslo": "LOC", "Bergen": "LOC"}
    caps = probe(LLMClient(make_settings()), Plan())
    assert caps.context_tokens == window and caps.context.startswith(f"Ollama's {source}")
    client = make_client(llm_probe=True, predict_deadline=60)
    assert region_tuples_per_task(predict(client, [long_text(240)]), "text") == [["Oslo", "Bergen"]]
    chats = [body for body in llm.requests if not is_probe(body)]
    assert len(chats) > 1 and all(prompt_chars(body) // 4 < window for body in chats)  # cut into chunks that fit


def test_vllms_max_model_len_sizes_the_chunks_before_any_400(make_client, llm):
    llm.context_tokens, llm.model_fields = 1024, {"max_model_len": 1024}  # vLLM lists it in /v1/models
    llm.gazetteer = {"Oslo": "LOC", "Bergen": "LOC"}
    client = make_client(llm_probe=True, predict_deadline=60)
    assert region_tuples_per_task(predict(client, [long_text(120)]), "text") == [["Oslo", "Bergen"]]
    assert not any(too_long(llm, body) for body in llm.requests)
