"""Alignment through /predict: long texts in chunks, overlapping labels where the config allows them."""

import functools
import re

import pytest

from tests.conftest import NER_CONFIG, predict_texts
from tests.fake_llm import entities_reply, last_user_text


@pytest.fixture
def make_client(make_client):
    return functools.partial(make_client, llm_cache=False)


def regions(entry):
    return [(r["value"]["start"], r["value"]["end"], r["value"]["text"], r["value"]["labels"][0]) for r in entry["result"]]


def prompt_text(body):
    return re.search(r"<text>\n(.*)\n</text>", last_user_text(body), re.S).group(1)


def test_a_long_text_is_labelled_in_chunks_within_the_budget_without_duplicates_at_seams(make_client, llm):
    client = make_client(llm_context_chars=400, llm_chunk_overlap=60, label_all_mentions=False)
    llm.gazetteer = {"Ada Lovelace": "PER", "Charles Babbage": "PER", "London": "LOC", "Analytical Engine": "MISC"}
    text = "".join(
        f"Paragraph {i}: Ada Lovelace met Charles Babbage in London 🎉 about the Analytical\u00a0Engine.\r\n"
        for i in range(30)
    )
    (entry,) = predict_texts(client, [text])
    chunk_texts = [prompt_text(body) for body in llm.requests]
    assert len(chunk_texts) >= len(text) // 400 and all(len(t) <= 400 for t in chunk_texts)
    expected = sorted(
        (m.start(), m.end(), m.group(), label)
        for surface, label in [("Ada Lovelace", "PER"), ("Charles Babbage", "PER"), ("London", "LOC")]
        for m in re.finditer(re.escape(surface), text)
    )
    # "Analytical\u00a0Engine" is never listed by the fake (it looks for a plain space): only exact names
    assert regions(entry) == expected


def test_a_long_text_whose_entities_the_llm_spells_differently_still_gets_exact_spans(make_client, llm):
    client = make_client(llm_context_chars=300, llm_chunk_overlap=50)
    text = "We met at the “Royal\u00a0Society” of London.\r\n" * 20

    def respond(body):
        chunk = prompt_text(body)
        return entities_reply([('"Royal Society"', "ORG")] * chunk.count("Royal"))

    llm.responder = respond
    (entry,) = predict_texts(client, [text])
    assert len(llm.requests) > 1
    assert [r[2] for r in regions(entry)] == ["“Royal\u00a0Society”"] * 20
    assert all(text[s:e] == t for s, e, t, _ in regions(entry))


OVERLAP_CONFIG = NER_CONFIG.replace('<Labels name="label" toName="text">', '<Labels name="label" toName="text" allowOverlap="true">')


def test_nested_entities_are_kept_only_when_the_labels_allow_overlap(make_client, llm):
    client = make_client()
    answer = [("Bank of America", "ORG"), ("America", "LOC")]
    llm.replies.append(entities_reply(answer))
    (strict,) = predict_texts(client, ["Bank of America"])
    llm.replies.append(entities_reply(answer))
    (nested,) = predict_texts(client, ["Bank of America"], config=OVERLAP_CONFIG)
    assert regions(strict) == [(0, 15, "Bank of America", "ORG")]
    assert regions(nested) == [(0, 15, "Bank of America", "ORG"), (8, 15, "America", "LOC")]


def test_dropped_entities_are_counted_by_reason_in_metrics(make_client, llm):
    client = make_client()
    llm.replies.append(entities_reply([("Atlantis", "LOC"), ("Paris", "LOC"), ("Paris", "LOC"), ("Paris", "CITY")]))
    predict_texts(client, ["Paris"])
    metrics = client.get("/metrics").data.decode()
    for reason in ("not_found", "repeated", "unknown_label"):
        assert re.search(rf'llm_ner_dropped_entities_total{{reason="{reason}"}} [1-9]', metrics), reason
