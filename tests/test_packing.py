"""Packing (PACK_SIZE > 1): several short texts per LLM call, each task still gets its own answer."""

from __future__ import annotations

import functools
import json
import math

import pytest

from backend.tools.conll import build_units, read_conll
from tests.conftest import WIKIGOLD, annotation_event, predict, region_tuples_per_task, span
from tests.fake_llm import Reply


@pytest.fixture
def make_client(make_client):
    return functools.partial(make_client, setup_project="7")


SPAN = ("text", "start", "label")  # how a pre-label is compared here
GAZETTEER = {"Oslo": "LOC", "Ada Lovelace": "PER", "Apple": "ORG", "Rome": "LOC"}
TEXTS = ["Oslo is cold.", "Ada Lovelace wrote.", "Nothing.", "Apple in Rome.", "Rome and Oslo.", "Ada Lovelace in Rome."]


def expected(text):
    found = []
    for surface, label in GAZETTEER.items():
        start = text.find(surface)
        while start != -1:
            found.append((surface, start, label))
            start = text.find(surface, start + 1)
    return sorted(found, key=lambda s: s[1])


def packed_texts(request):
    return request["messages"][-1]["content"].count('<text id="')


def test_packing_is_off_by_default(make_client, llm):
    llm.gazetteer = GAZETTEER
    assert region_tuples_per_task(predict(make_client(), TEXTS), *SPAN) == [expected(t) for t in TEXTS]
    assert len(llm.requests) == len(TEXTS) and not any(packed_texts(r) for r in llm.requests)


def test_packed_calls_answer_every_task_in_order(make_client, llm):
    llm.gazetteer = GAZETTEER
    assert region_tuples_per_task(predict(make_client(pack_size=4), TEXTS), *SPAN) == [expected(t) for t in TEXTS]
    assert sorted(packed_texts(r) for r in llm.requests) == [2, 4]
    schema = llm.requests[0]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["results"]["items"]["properties"]["entities"]["items"]["properties"]["label"]["enum"] == ["PER", "ORG", "LOC", "MISC"]


def test_packed_answers_are_cached_per_text(make_client, llm):
    llm.gazetteer = GAZETTEER
    client = make_client(pack_size=4)
    predict(client, TEXTS)
    calls = len(llm.requests)
    assert region_tuples_per_task(predict(client, TEXTS[::-1]), *SPAN) == [expected(t) for t in TEXTS[::-1]]
    unpacked = make_client()  # packing off: the same cache keys
    assert region_tuples_per_task(predict(unpacked, TEXTS[:2]), *SPAN) == [expected(t) for t in TEXTS[:2]]
    assert len(llm.requests) == calls


def test_a_text_the_packed_answer_leaves_out_is_asked_alone(make_client, llm):
    llm.gazetteer = GAZETTEER
    partial = {"results": [{"id": "1", "entities": [{"text": "Oslo", "label": "LOC"}]}, {"id": "2", "entities": []}]}
    llm.replies.append(Reply(content=json.dumps(partial)))
    assert region_tuples_per_task(predict(make_client(pack_size=3), TEXTS[:3]), *SPAN) == [[("Oslo", 0, "LOC")], [], []]
    assert [packed_texts(r) for r in llm.requests] == [3, 0]
    assert "Nothing." in llm.requests[1]["messages"][-1]["content"]


def test_a_failed_pack_falls_back_to_one_call_per_text(make_client, llm):
    llm.gazetteer = GAZETTEER
    llm.replies.append(Reply(status=500))
    client = make_client(pack_size=3, llm_max_retries=0)
    assert region_tuples_per_task(predict(client, TEXTS[:3]), *SPAN) == [expected(t) for t in TEXTS[:3]]
    assert [packed_texts(r) for r in llm.requests] == [3, 0, 0, 0]


def test_long_texts_are_not_packed(make_client, llm):
    llm.gazetteer = GAZETTEER
    long_text = "Oslo " + "x" * 200
    texts = [TEXTS[0], long_text, TEXTS[1]]
    assert region_tuples_per_task(predict(make_client(pack_size=4, pack_max_chars=100), texts), *SPAN) == [expected(t) for t in texts]
    assert sorted(packed_texts(r) for r in llm.requests) == [0, 2]


def test_a_packed_answer_that_does_not_parse_gets_one_repair_turn(make_client, llm):
    llm.gazetteer = GAZETTEER
    fixed = {"results": [{"id": "1", "entities": [{"text": "Oslo", "label": "LOC"}]}, {"id": "2", "entities": []}]}
    llm.replies.extend([Reply(content="Here you go: Oslo is a LOC"), Reply(content=json.dumps(fixed))])
    assert region_tuples_per_task(predict(make_client(pack_size=2), TEXTS[:2]), *SPAN) == [[("Oslo", 0, "LOC")], []]
    repair = llm.requests[1]["messages"]
    assert repair[-2] == {"role": "assistant", "content": "Here you go: Oslo is a LOC"}
    assert "\"results\" list" in repair[-1]["content"] and len(llm.requests) == 2


def annotate(client, task_id, unit):
    result = [span(unit.text, e.text, e.label, start=e.start, end=e.end) for e in unit.entities]
    event = annotation_event("ANNOTATION_CREATED", task_id, task_id, unit.text, result, project=7)
    assert client.post("/webhook", json=event).status_code == 201


def test_packing_cuts_prompt_tokens_per_conll_sentence_at_least_3x(tmp_path, make_client, llm):
    from backend.infra.usage import UsageLedger

    units = [u for u in build_units(read_conll(WIKIGOLD), per="sentence") if u.entities][:35]
    llm.gazetteer = {e.text: e.label for u in units for e in u.entities}
    per_task = {}
    for pack in (1, 8):
        client = make_client(pack_size=pack, model_dir=tmp_path / f"model-{pack}")
        for i, unit in enumerate(units[:3]):
            annotate(client, 1000 + i, unit)
        texts = [u.text for u in units[3:]]
        predict(client, texts, project="7.1")
        shown = [(len(r["messages"]) - 2) // 2 if pack == 1 else packed_texts({"messages": r["messages"][1:2]}) for r in llm.requests]
        assert shown and all(n == 3 for n in shown), shown  # every prompt showed the 3 examples
        totals = UsageLedger.in_dir(tmp_path / f"model-{pack}").totals("7")
        per_task[pack] = totals["prompt_tokens"] / len(texts)
        llm.requests.clear()
    assert per_task[1] >= 3 * per_task[8], per_task


def test_packed_answers_keep_logprob_scores_per_text(make_client, llm):
    content = json.dumps({"results": [
        {"id": "1", "entities": [{"text": "Oslo", "label": "LOC"}]},
        {"id": "2", "entities": [{"text": "Ada Lovelace", "label": "PER"}]},
    ]})
    tokens = [(ch, -0.5 if ch == "P" else -0.001) for ch in content]  # "PER" is the doubtful label
    llm.replies.append(Reply(content=content, logprobs=tokens))
    oslo, ada = predict(make_client(pack_size=2), TEXTS[:2])["results"]
    assert oslo["result"][0]["score"] == pytest.approx(math.exp(-0.001 * 7), abs=1e-4)  # O, s, l, o; L, O, C
    assert ada["result"][0]["score"] == pytest.approx(math.exp(-0.001 * 14 - 0.5), abs=1e-4)
    assert ada["score"] < oslo["score"]


def test_a_pack_cut_by_the_deadline_leaves_time_for_the_answered_ones(make_client, llm):
    llm.gazetteer = GAZETTEER
    slow = lambda content: "Nothing." in content or "Apple in Rome." in content
    llm.responder = lambda body: Reply(delay=10) if slow(body["messages"][-1]["content"]) else llm.gazetteer_reply(body)
    # first pack (answered at once): Oslo, Ada; second pack, and its texts asked alone, never in time
    client = make_client(pack_size=2, predict_deadline=3, predict_concurrency=2)
    results = region_tuples_per_task(predict(client, TEXTS[:4]), *SPAN)
    assert results[:2] == [expected(TEXTS[0]), expected(TEXTS[1])]
    assert results[2:] == [None, None]
