"""Defects an independent probe of the running backend found (issue 16, section 2), by class.

Each test failed on the code before its fix. The webhook classes (resource exhaustion, forgery, ids,
times, lone surrogates, id lists) are in tests/test_trust.py; load and slow clients in
tests/test_load.py; disk and store faults in tests/test_store_faults.py.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import socket
import time

import pytest

from tests.conftest import NER_CONFIG, annotation_event, metric, predict, region_tuples, span
from tests.fake_llm import Reply, entities_reply
from tests.processes import TEST_API_KEY


def results(client, texts, **fields) -> list:
    """Each task's entry of a checked /predict answer (a failed task's is [])."""
    return predict(client, texts, **fields)["results"]


def regions(entry) -> list[tuple[str, str]]:
    return region_tuples(entry["result"], "text", "label")


def dropped_entities() -> float:
    """Entities dropped so far in this process as empty or without a known label."""
    return sum(metric("llm_ner_dropped_entities_total", reason=reason) for reason in ("empty", "unknown_label"))


# ---- chunking ----
def test_a_grapheme_cluster_longer_than_the_context_is_chunked_with_progress(make_client, llm):
    """One letter with 13,000 combining marks made the chunker advance one character a chunk: 1,015
    LLM calls for one task, quadratic CPU, past the deadline."""
    from backend.spans.chunking import split

    text = "Ada Lovelace met Babbage. " * 20 + "e" + "\u0301" * 13_000 + " Then Ada went to London."
    chunks = split(text, 1200, 300)
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    assert all(c.end - c.start <= 1200 for c in chunks)
    assert all(b.start > a.start and b.start <= a.end for a, b in zip(chunks, chunks[1:]))
    assert len(chunks) <= math.ceil(len(text) / (1200 - 2 * 300)) + 1

    llm.gazetteer = {"Ada": "PER", "London": "LOC"}
    client = make_client(llm_context_chars=1200, llm_chunk_overlap=300, predict_deadline=30)
    started = time.monotonic()
    (entry,) = results(client, [text])
    assert time.monotonic() - started < 20
    assert len(llm.requests) <= len(chunks)  # chunks inside the cluster are alike: some come from the cache
    assert ("London", "LOC") in regions(entry)


# ---- answers ----
@pytest.mark.parametrize(
    "bad",
    [{"text": "", "label": "PER"}, {"text": "Ada", "label": None}, {"text": None, "label": "ORG"}, {"label": "PER"}, 5, "Ada"],
    ids=["empty-text", "null-label", "null-text", "no-text", "number", "string"],
)
def test_one_unusable_entity_drops_alone_not_the_whole_answer(make_client, llm, bad):
    content = json.dumps({"entities": [{"text": "Oslo", "label": "LOC"}, bad, {"text": "Bergen", "label": "LOC"}]})
    llm.replies.append(Reply(content=content))
    dropped_before = dropped_entities()
    (entry,) = results(make_client(), ["Oslo and Bergen."])
    assert regions(entry) == [("Oslo", "LOC"), ("Bergen", "LOC")]
    assert len(llm.requests) == 1  # no repair turn
    dropped = dropped_entities()
    assert dropped == dropped_before + 1


def test_an_answer_whose_every_entity_is_unusable_gets_the_repair_turn(make_client, llm):
    llm.replies.extend([Reply(content='{"entities": [{"text": "Oslo", "label": null}]}'), entities_reply([("Oslo", "LOC")])])
    (entry,) = results(make_client(), ["Oslo."])
    assert regions(entry) == [("Oslo", "LOC")]
    assert "entities.0.label" in llm.requests[1]["messages"][-1]["content"]


def test_a_packed_answer_drops_an_unusable_entity_alone(make_client, llm):
    content = json.dumps({"results": [
        {"id": "1", "entities": [{"text": "Oslo", "label": "LOC"}, {"text": "", "label": "LOC"}]},
        {"id": "2", "entities": [{"text": "Bergen", "label": "LOC"}]},
    ]})
    llm.replies.append(Reply(content=content))
    first, second = results(make_client(pack_size=4), ["Oslo.", "Bergen."])
    assert (regions(first), regions(second)) == ([("Oslo", "LOC")], [("Bergen", "LOC")])
    assert len(llm.requests) == 1


@pytest.mark.parametrize("logprob, score", [(50.0, 1.0), (1e300, 1.0), (-math.inf, 0.0), (math.nan, None)])
def test_span_scores_stay_within_0_and_1_whatever_the_logprobs(make_client, llm, logprob, score):
    content = json.dumps({"entities": [{"text": "Oslo", "label": "LOC"}]})
    pieces = ['{"', "entities", '":', ' [{"', "text", '":', ' "', "Oslo", '",', ' "', "label", '":', ' "', "LOC", '"}', "]}"]
    tokens = [(t, logprob if t in ("Oslo", "LOC") else -0.01) for t in pieces]
    assert "".join(t for t, _ in tokens) == content
    llm.replies.append(Reply(content=content, logprobs=tokens))
    (entry,) = results(make_client(llm_cache=False), ["Oslo."])
    (region,) = entry["result"]
    assert region.get("score") == score


# ---- 500s where a 4xx or one result per task is promised ----
def test_from_name_as_a_list_in_an_interactive_context_is_ignored_not_a_500(make_client, llm):
    llm.gazetteer = {"Ada": "PER"}
    context = {"result": [{"from_name": ["label"], "to_name": "text", "type": "labels",
                           "value": {"start": 0, "end": 3, "text": "Ada", "labels": ["PER"]}},
                          {"from_name": {"x": 1}, "value": {}}]}
    (entry,) = results(make_client(), ["Ada and Ada."], params={"context": context})
    assert regions(entry) == [("Ada", "PER"), ("Ada", "PER")]


@pytest.mark.parametrize(
    "usage", [{"prompt_tokens": 10**30, "completion_tokens": 5}, {"prompt_tokens": -50, "completion_tokens": -1},
              {"prompt_tokens": 1e30, "completion_tokens": True}, {"prompt_tokens": "many"}],
    ids=["10^30", "negative", "float-and-bool", "string"],
)
def test_a_providers_absurd_usage_counts_nothing_and_loses_no_result(make_client, llm, settings, usage):
    llm.replies.append(entities_reply([("Oslo", "LOC")], usage=usage))
    client = make_client()
    (entry,) = results(client, ["Oslo."], project="3.1")
    assert regions(entry) == [("Oslo", "LOC")]
    from backend.infra.usage import UsageLedger

    totals = UsageLedger.in_dir(settings.model_dir).totals("3")
    assert (totals["calls"], totals["tasks"]) == (1, 1)
    assert 0 <= totals["prompt_tokens"] <= 5 and 0 <= totals["completion_tokens"] <= 5


@pytest.mark.parametrize("value", ["nan", "NaN", "-nan"])
def test_retry_after_nan_falls_back_to_the_backoff(value):
    from backend.llm.client import retry_after_seconds

    assert retry_after_seconds({"retry-after": value}) is None
    assert retry_after_seconds({"retry-after-ms": value, "retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "inf"}) == math.inf  # a quota that never comes back: fail at once


def test_retries_after_a_nan_retry_after_are_spaced_by_the_backoff(make_client, llm):
    llm.replies.extend([Reply(status=429, headers={"Retry-After": "nan"})] * 2 + [entities_reply([("Oslo", "LOC")])])
    (entry,) = results(make_client(llm_retry_base=0.2, llm_retry_cap=0.2), ["Oslo."])
    assert regions(entry) == [("Oslo", "LOC")]
    gaps = [b - a for a, b in zip(llm.request_times, llm.request_times[1:])]
    assert len(gaps) == 2 and sum(gaps) > 0.02  # full jitter in [0, 0.2] twice: not both ~0 (p < 1e-2)


def _raw_http(url: str, request: bytes, timeout: float = 30) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_chunked_bodies_an_invalid_one_is_a_400_and_one_over_the_limit_a_413(backend_factory):
    backend = backend_factory(workers=1, MAX_REQUEST_BYTES="100000")
    head = (
        b"POST /setup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
    )
    invalid = _raw_http(backend.url, head + b"zz\r\n{}\r\n0\r\n\r\n")
    assert invalid.startswith(b"HTTP/1.1 400"), invalid[:300]
    assert b'"error"' in invalid and b"chunked" in invalid
    body = json.dumps({"project": "1", "schema": NER_CONFIG + " " * 150_000}).encode()
    pieces = [body[i : i + 8192] for i in range(0, len(body), 8192)]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    too_large = _raw_http(backend.url, head + chunked)
    assert too_large.startswith(b"HTTP/1.1 413"), too_large[:300]
    exact = json.dumps({"project": "1", "schema": NER_CONFIG}).encode()
    small = _raw_http(backend.url, head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(exact), exact))
    assert small.startswith(b"HTTP/1.1 200"), small[:300]
    assert "Traceback" not in backend.log()


# ---- lesser ones ----
def test_the_debug_access_log_never_shows_a_malformed_basic_auth_credential(backend_factory):
    import httpx

    password = "malformed-secret-3e3e"
    backend = backend_factory(workers=1, LOG_LEVEL="DEBUG", BASIC_AUTH_USER="robot", BASIC_AUTH_PASS="right-pass-9c9c")
    for credential in (password, f"{password}:", f"robot{password}"):  # no colon, an empty user, ...
        header = "Basic " + base64.b64encode(credential.encode()).decode()
        assert httpx.post(backend.url + "/setup", json={}, headers={"Authorization": header}).status_code == 401
    log = backend.log()
    assert '"POST /setup HTTP/1.1" 401' in log  # the access log is on
    assert password not in log


def test_masking_hides_whole_secrets_in_every_spelling_and_never_text_that_shares_a_prefix():
    from backend.infra.logs import RedactingFormatter

    password = "models-are-42-Strong!/p@ss"  # starts with an ordinary word
    key = "sk-proj-4f9a1c2b3d4e5f60718293a4b5c6d7e8"
    formatter = RedactingFormatter("%(message)s", [password, key])
    line = lambda text: formatter.format(logging.LogRecord("x", logging.INFO, __file__, 1, text, None, None))
    # text that merely shares a start with a secret is left alone (a prefix rule blanked "models" in every path)
    assert line("loaded /srv/models/ner and /srv/models-are/x") == "loaded /srv/models/ner and /srv/models-are/x"
    assert line("Incorrect API key provided: sk-proj-****d7e8") == "Incorrect API key provided: sk-proj-****d7e8"
    # the whole secret, as written, URL-encoded (userinfo, form bodies) and JSON-escaped
    assert line(f"key {key} rejected") == "key *** rejected"
    assert line(f"login failed: {password}.") == "login failed: ***."
    assert line("postgresql://bob:models-are-42-Strong%21%2Fp%40ss@db/x") == "postgresql://bob:***@db/x"
    assert line("form: password=models-are-42-Strong%21%2Fp%40ss&user=bob") == "form: password=***&user=bob"
    assert line(json.dumps({"error": f"bad {password}"})) == '{"error": "bad ***"}'
    # and any URL's password, configured or not
    assert line("proxy http://robot:hunter2hunter@proxy:3128 refused") == "proxy http://robot:***@proxy:3128 refused"


def test_the_llm_clients_error_messages_mask_an_echoed_key(make_client, llm, caplog):
    caplog.set_level(logging.INFO)
    llm.replies.append(Reply(status=400, error_message=f"invalid request from key {TEST_API_KEY}"))
    assert results(make_client(), ["Oslo."]) == [[]]  # failed: unanswered, Label Studio asks again
    assert "invalid request from key ***" in caplog.text and TEST_API_KEY not in caplog.text


def test_an_error_message_cut_short_never_leaves_the_head_of_an_echoed_key(make_client, llm, caplog):
    # error texts are cut to a few hundred characters before they are masked: a key that straddles the
    # cut was no longer the whole secret the masking looks for, and its first characters went out
    caplog.set_level(logging.INFO)
    # openai's message is "Error code: 400 - <the server's message>": the key starts at its character 290
    llm.replies.append(Reply(status=400, error_message="x" * 272 + f"{TEST_API_KEY} is not valid"))
    assert results(make_client(), ["Oslo."]) == [[]]
    assert "HTTP 400 from the LLM endpoint" in caplog.text
    assert TEST_API_KEY[:8] not in caplog.text


def test_a_long_error_message_without_spaces_is_cut_between_characters_not_dropped(make_client, llm, caplog):
    # a Chinese message has no space to cut at: it is cut before a character, not dropped whole
    caplog.set_level(logging.INFO)
    llm.replies.append(Reply(status=400, error_message="请求无效" * 100))
    assert results(make_client(), ["Oslo."]) == [[]]
    assert "HTTP 400 from the LLM endpoint: Error code: 400 - 请求无效请求无效" in caplog.text


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_non_ascii_basic_auth_works_as_utf8_and_as_latin1(make_client, encoding):
    user, password = "jürgen", "pässwörd-ß"
    client = make_client(basic_auth_user=user, basic_auth_pass=password)
    good = "Basic " + base64.b64encode(f"{user}:{password}".encode(encoding)).decode()
    wrong = "Basic " + base64.b64encode(f"{user}:passwörd-ß".encode(encoding)).decode()
    body = {"project": "1", "schema": NER_CONFIG}
    assert client.post("/setup", json=body, headers={"Authorization": good}).status_code == 200
    assert client.post("/setup", json=body, headers={"Authorization": wrong}).status_code == 401


TWO_TEXTS = """<View>
  <Labels name="label" toName="t1,t2">
    <Label value="PER"/><Label value="LOC"/>
  </Labels>
  <Text name="t1" value="$first"/>
  <Text name="t2" value="$second"/>
</View>"""


def test_a_correction_on_each_text_of_a_labels_serving_two_is_kept(make_client, llm, settings):
    from backend.infra.storage import Database
    from backend.learning.store import ExampleStore

    client = make_client()
    assert client.post("/setup", json={"project": "7", "schema": TWO_TEXTS}).status_code == 200
    first, second = "Ada went to Paris.", "Bob stayed in Rome."
    event = annotation_event("ANNOTATION_CREATED", 11, 1, first, [
        {**span(first, "Ada", "PER"), "to_name": "t1"}, {**span(second, "Rome", "LOC"), "to_name": "t2"}])
    event["task"]["data"] = {"first": first, "second": second}
    assert client.post("/webhook", json=event).status_code == 201
    stored = ExampleStore(Database.in_dir(settings.model_dir), "7").examples()
    examples = {e.from_name: (e.text, [(s.text, s.label) for s in e.spans]) for e in stored}
    assert examples == {"label>t1": (first, [("Ada", "PER")]), "label>t2": (second, [("Rome", "LOC")])}

    llm.gazetteer = {"Carl": "PER"}
    tasks = [{"id": 2, "data": {"first": "Carl went to Paris.", "second": "Carl stayed in Rome."}}]
    response = client.post("/predict", json={"tasks": tasks, "project": "7.1", "label_config": TWO_TEXTS})
    assert response.status_code == 200
    shown = [[m["content"] for m in r["messages"][1:-1]] for r in llm.requests]
    assert sorted(len(s) for s in shown) == [2, 2]  # each text is shown its own text's example
    assert any(first in s[0] for s in shown) and any(second in s[0] for s in shown)
    assert sorted(r["to_name"] for r in response.json["results"][0]["result"]) == ["t1", "t2"]


# ---- the example index ----
def test_examples_too_long_to_ever_be_shown_stay_out_of_the_index(make_client, settings):
    from backend.infra.storage import Database
    from backend.learning.store import ExampleStore

    client = make_client(setup_project="7", few_shot_token_budget=200)
    long_text = "Jordan " * 2000
    for i, text in enumerate(["Jordan signed.", long_text], start=1):
        event = annotation_event("ANNOTATION_CREATED", i, i, text, [span(text, "Jordan", "PER")])
        assert client.post("/webhook", json=event).status_code == 201
    indexes = ExampleStore(Database.in_dir(settings.model_dir), "7").indexes(token_budget=200)
    assert [e.text for e in indexes["label"].examples] == ["Jordan signed."]


def test_building_the_example_index_runs_under_the_predict_deadline(make_client, llm, monkeypatch):
    from backend.learning import store

    client = make_client(setup_project="7", predict_deadline=1)
    assert client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 1, 1, "Jordan signed.", [])).status_code == 201
    real = store.ExampleIndex

    def slow_index(examples):
        time.sleep(20)  # stands for a huge example set (and ends within the 30 s kept work has after the test)
        return real(examples)

    monkeypatch.setattr(store, "ExampleIndex", slow_index)
    started = time.monotonic()
    assert results(client, ["Oslo."], project="7.1") == [[]]  # cut by the deadline: unanswered
    assert time.monotonic() - started < 15  # at the deadline, not after the 20 s index
