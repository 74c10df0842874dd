"""Span and task scores: from token logprobs, from agreement between samples, or none."""

from __future__ import annotations

import functools
import json
import math

import pytest

from backend.ner import confidence
from tests.conftest import predict, region_tuples
from tests.fake_llm import Reply


@pytest.fixture
def make_client(make_client):
    return functools.partial(make_client, llm_cache=False)


def tokenize(content: str, doubtful: dict[str, float]) -> list[tuple[str, float]]:
    """Split like a BPE would (words, quotes, punctuation); a token in `doubtful` gets that logprob."""
    import re

    tokens = re.findall(r'\w+|\s+|[^\w\s]', content)
    assert "".join(tokens) == content
    return [(t, doubtful.get(t, -0.01)) for t in tokens]


def test_span_scores_come_from_token_logprobs_and_the_task_score_is_the_lowest(make_client, llm):
    content = json.dumps({"entities": [{"text": "Tim Cook", "label": "PER"}, {"text": "Apple", "label": "ORG"}]})
    tokens = tokenize(content, {"Apple": -1.5, "ORG": -0.7})
    llm.replies.append(Reply(content=content, logprobs=tokens))
    (entry,) = predict(make_client(), ["Tim Cook runs Apple."], project="2")["results"]
    assert llm.requests[0]["logprobs"] is True
    scores = {r["value"]["text"]: r["score"] for r in entry["result"]}
    # exp(sum of the logprobs of the tokens inside the "text" and "label" strings)
    assert scores["Tim Cook"] == pytest.approx(math.exp(-0.01 * 3 + -0.01), abs=1e-4)  # Tim, " ", Cook; PER
    assert scores["Apple"] == pytest.approx(math.exp(-1.5 - 0.7), abs=1e-4)
    assert entry["score"] == scores["Apple"]


def test_doubtful_tasks_score_lower_so_sorting_by_score_shows_them_first(make_client, llm):
    sure = json.dumps({"entities": [{"text": "Oslo", "label": "LOC"}]})
    unsure = json.dumps({"entities": [{"text": "Jordan", "label": "LOC"}]})
    llm.replies.extend([
        Reply(content=sure, logprobs=tokenize(sure, {})),
        Reply(content=unsure, logprobs=tokenize(unsure, {"LOC": -1.1})),
    ])
    sure_entry, unsure_entry = predict(make_client(predict_concurrency=1), ["Oslo.", "Jordan."], project="2")["results"]
    assert unsure_entry["score"] < 0.4 < 0.9 < sure_entry["score"]


def test_a_task_without_entities_is_scored_by_the_probability_of_its_empty_answer(make_client, llm):
    empty = '{"entities": []}'
    llm.replies.append(Reply(content=empty, logprobs=tokenize(empty, {"]": -0.9})))
    (entry,) = predict(make_client(), ["Nothing here."], project="2")["results"]
    assert entry["result"] == [] and entry["score"] == pytest.approx(math.exp(-0.9 - 0.01 * (len(tokenize(empty, {})) - 1)), abs=1e-4)


def test_with_samples_spans_are_scored_by_agreement_and_minority_entities_left_out(make_client, llm):
    a = json.dumps({"entities": [{"text": "Paris", "label": "LOC"}, {"text": "Hilton", "label": "ORG"}]})
    b = json.dumps({"entities": [{"text": "Paris", "label": "LOC"}, {"text": "Hilton", "label": "PER"}]})
    c = json.dumps({"entities": [{"text": "Paris", "label": "LOC"}, {"text": "Hilton", "label": "ORG"}, {"text": "Ritz", "label": "ORG"}]})
    llm.replies.append(Reply(choices=[a, b, c]))
    client = make_client(llm_samples=3, llm_logprobs=False)
    (entry,) = predict(client, ["Paris Hilton met at the Ritz."], project="2")["results"]
    request = llm.requests[0]
    assert request["n"] == 3 and request["temperature"] == pytest.approx(0.7)
    scores = {(r["value"]["text"], r["value"]["labels"][0]): r["score"] for r in entry["result"]}
    assert scores == {("Paris", "LOC"): 1.0, ("Hilton", "ORG"): pytest.approx(0.6667, abs=1e-3)}
    assert entry["score"] == pytest.approx(0.6667, abs=1e-3)


def test_without_logprobs_or_samples_there_is_no_score(make_client, llm):
    llm.gazetteer = {"Oslo": "LOC"}
    llm.reject_logprobs = True
    (entry,) = predict(make_client(), ["Oslo."], project="2")["results"]
    assert region_tuples(entry["result"], "text") == ["Oslo"]
    assert "score" not in entry and "score" not in entry["result"][0]
    assert [("logprobs" in r) for r in llm.requests] == [True, False]  # rejected once, then not asked again


def test_logprob_scores_find_entities_whatever_the_key_order():
    content = '{"entities": [{"label": "LOC", "text": "Rome"}, {"label": "PER", "text": "Rome"}]}'
    tokens = tokenize(content, {})
    tokens[[t for t, _ in tokens].index("PER")] = ("PER", -2.0)
    first, second = confidence.logprob_scores(content, tokens, [("Rome", "LOC"), ("Rome", "PER")])
    assert first == pytest.approx(math.exp(-0.02), abs=1e-4)
    assert second == pytest.approx(math.exp(-2.01), abs=1e-4)


def test_logprobs_that_do_not_spell_the_content_give_no_score():
    assert confidence.logprob_scores('{"entities": []}', [("x", -0.1)], [("a", "B")]) == [None]
