"""Packing (PACK_SIZE > 1): several short texts per LLM call, each task still gets its own answer."""

from __future__ import annotations

import functools
import json
import math

import pytest

from backend.tools.conll import build_units, read_conll
from tests.conftest import NER_CONFIG, WIKIGOLD, predict_texts
from tests.fake_llm import Reply


@pytest.fixture
def make_client(make_client):
    return functools.partial(make_client, setup_project="7")


GAZETTEER = {"Oslo": "LOC", "Ada Lovelace": "PER", "Apple": "ORG", "Rome": "LOC"}
TEXTS = ["Oslo is cold.", "Ada Lovelace wrote.", "Nothing.", "Apple in Rome.", "Rome and Oslo.", "Ada Lovelace in Rome."]


def predict(client, texts):
    """Each task's spans; None for a task left unanswered (asked again later)."""
    results = predict_texts(client, texts, "7.1")
    assert len(results) == len(texts)
    return [None if e == [] else [(r["value"]["text"], r["value"]["start"], r["value"]["labels"][0]) for r in e["result"]] for e in results]


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
    assert predict(make_client(), TEXTS) == [expected(t) for t in TEXTS]
    assert len(llm.requests) == len(TEXTS) and not any(packed_texts(r) for r in llm.requests)


def test_packed_calls_answer_every_task_in_order(make_client, llm):
    llm.gazetteer = GAZETTEER
    assert predict(make_client(pack_size=4), TEXTS) == [expected(t) for t in TEXTS]
    assert sorted(packed_texts(r) for r in llm.requests) == [2, 4]
    schema = llm.requests[0]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["results"]["items"]["properties"]["entities"]["items"]["properties"]["label"]["enum"] == ["PER", "ORG", "LOC", "MISC"]


def test_packed_answers_are_cached_per_text(make_client, llm):
    llm.gazetteer = GAZETTEER
    client = make_client(pack_size=4)
    predict(client, TEXTS)
    calls = len(llm.requests)
    assert predict(client, TEXTS[::-1]) == [expected(t) for t in TEXTS[::-1]]
    assert predict(make_client(), TEXTS[:2]) == [expected(t) for t in TEXTS[:2]]  # packing off: same cache keys
    assert len(llm.requests) == calls


def test_a_text_the_packed_answer_leaves_out_is_asked_alone(make_client, llm):
    llm.gazetteer = GAZETTEER
    partial = {"results": [{"id": "1", "entities": [{"text": "Oslo", "label": "LOC"}]}, {"id": "2", "entities": []}]}
    llm.replies.append(Reply(content=json.dumps(partial)))
    assert predict(make_client(pack_size=3), TEXTS[:3]) == [[("Oslo", 0, "LOC")], [], []]
    assert [packed_texts(r) for r in llm.requests] == [3, 0]
    assert "Nothing." in llm.requests[1]["messages"][-1]["content"]


def test_a_failed_pack_falls_back_to_one_call_per_text(make_client, llm):
    llm.gazetteer = GAZETTEER
    llm.replies.append(Reply(status=500))
    assert predict(make_client(pack_size=3, llm_max_retries=0), TEXTS[:3]) == [expected(t) for t in TEXTS[:3]]
    assert [packed_texts(r) for r in llm.requests] == [3, 0, 0, 0]


def test_long_texts_are_not_packed(make_client, llm):
    llm.gazetteer = GAZETTEER
    long_text = "Oslo " + "x" * 200
    assert predict(make_client(pack_size=4, pack_max_chars=100), [TEXTS[0], long_text, TEXTS[1]]) == [
        expected(TEXTS[0]), expected(long_text), expected(TEXTS[1])]
    assert sorted(packed_texts(r) for r in llm.requests) == [0, 2]


def test_a_packed_answer_that_does_not_parse_gets_one_repair_turn(make_client, llm):
    llm.gazetteer = GAZETTEER
    fixed = {"results": [{"id": "1", "entities": [{"text": "Oslo", "label": "LOC"}]}, {"id": "2", "entities": []}]}
    llm.replies.extend([Reply(content="Here you go: Oslo is a LOC"), Reply(content=json.dumps(fixed))])
    assert predict(make_client(pack_size=2), TEXTS[:2]) == [[("Oslo", 0, "LOC")], []]
    repair = llm.requests[1]["messages"]
    assert repair[-2] == {"role": "assistant", "content": "Here you go: Oslo is a LOC"}
    assert '{"results": [{"id"' in repair[-1]["content"] and len(llm.requests) == 2


def annotate(client, task_id, unit):
    result = [{"from_name": "label", "to_name": "text", "type": "labels", "origin": "manual",
               "value": {"start": e.start, "end": e.end, "text": e.text, "labels": [e.label]}} for e in unit.entities]
    event = {"action": "ANNOTATION_CREATED",
             "annotation": {"id": task_id, "task": task_id, "result": result, "was_cancelled": False, "ground_truth": False,
                            "completed_by": 1, "updated_at": "2025-01-01T10:00:00Z"},
             "task": {"id": task_id, "data": {"text": unit.text}},
             "project": {"id": 7, "label_config": NER_CONFIG, "title": "p"}}
    assert client.post("/webhook", json=event).status_code in (200, 201)


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
        predict(client, texts)
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
    tasks = [{"id": i + 1, "data": {"text": t}} for i, t in enumerate(TEXTS[:2])]
    body = make_client(pack_size=2).post("/predict", json={"tasks": tasks, "project": "7.1", "label_config": NER_CONFIG}).json
    oslo, ada = body["results"]
    assert oslo["result"][0]["score"] == pytest.approx(math.exp(-0.001 * 7), abs=1e-4)  # O, s, l, o; L, O, C
    assert ada["result"][0]["score"] == pytest.approx(math.exp(-0.001 * 14 - 0.5), abs=1e-4)
    assert ada["score"] < oslo["score"]


def test_a_pack_cut_by_the_deadline_leaves_time_for_the_answered_ones(make_client, llm):
    llm.gazetteer = GAZETTEER
    slow = lambda content: "Nothing." in content or "Apple in Rome." in content
    llm.responder = lambda body: Reply(delay=10) if slow(body["messages"][-1]["content"]) else llm.gazetteer_reply(body)
    # first pack (answered at once): Oslo, Ada; second pack, and its texts asked alone, never in time
    results = predict(make_client(pack_size=2, predict_deadline=3, predict_concurrency=2), TEXTS[:4])
    assert results[:2] == [expected(TEXTS[0]), expected(TEXTS[1])]
    assert results[2:] == [None, None]
