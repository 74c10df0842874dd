"""Alignment through /predict: long texts in chunks, overlapping labels where the config allows them."""

import functools
import re

import pytest

from tests.conftest import NER_CONFIG, metric, predict, region_tuples
from tests.fake_llm import entities_reply, last_user_text


@pytest.fixture
def make_client(make_client):
    return functools.partial(make_client, llm_cache=False)


SPAN = ("start", "end", "text", "label")  # how a pre-label is compared here


def prompt_text(body):
    return re.search(r"<text>\n(.*)\n</text>", last_user_text(body), re.S).group(1)


def test_a_long_text_is_labelled_in_chunks_within_the_budget_without_duplicates_at_seams(make_client, llm):
    client = make_client(llm_context_chars=400, llm_chunk_overlap=60, label_all_mentions=False)
    llm.gazetteer = {"Ada Lovelace": "PER", "Charles Babbage": "PER", "London": "LOC", "Analytical Engine": "MISC"}
    text = "".join(
        f"Paragraph {i}: Ada Lovelace met Charles Babbage in London 🎉 about the Analytical\u00a0Engine.\r\n"
        for i in range(30)
    )
    (entry,) = predict(client, [text])["results"]
    chunk_texts = [prompt_text(body) for body in llm.requests]
    assert len(chunk_texts) >= len(text) // 400 and all(len(t) <= 400 for t in chunk_texts)
    expected = sorted(
        (m.start(), m.end(), m.group(), label)
        for surface, label in [("Ada Lovelace", "PER"), ("Charles Babbage", "PER"), ("London", "LOC")]
        for m in re.finditer(re.escape(surface), text)
    )
    # "Analytical\u00a0Engine" is never listed by the fake (it looks for a plain space): only exact names
    assert region_tuples(entry["result"], *SPAN) == expected


def test_a_long_text_whose_entities_the_llm_spells_differently_still_gets_exact_spans(make_client, llm):
    client = make_client(llm_context_chars=300, llm_chunk_overlap=50)
    text = "We met at the “Royal\u00a0Society” of London.\r\n" * 20

    def respond(body):
        chunk = prompt_text(body)
        return entities_reply([('"Royal Society"', "ORG")] * chunk.count("Royal"))

    llm.responder = respond
    (entry,) = predict(client, [text])["results"]
    assert len(llm.requests) > 1
    found = region_tuples(entry["result"], *SPAN)
    assert [t for _, _, t, _ in found] == ["“Royal\u00a0Society”"] * 20
    assert all(text[s:e] == t for s, e, t, _ in found)


OVERLAP_CONFIG = NER_CONFIG.replace('<Labels name="label" toName="text">', '<Labels name="label" toName="text" allowOverlap="true">')


def test_nested_entities_are_kept_only_when_the_labels_allow_overlap(make_client, llm):
    client = make_client()
    answer = [("Bank of America", "ORG"), ("America", "LOC")]
    llm.replies.append(entities_reply(answer))
    (strict,) = predict(client, ["Bank of America"])["results"]
    llm.replies.append(entities_reply(answer))
    (nested,) = predict(client, ["Bank of America"], config=OVERLAP_CONFIG)["results"]
    assert region_tuples(strict["result"], *SPAN) == [(0, 15, "Bank of America", "ORG")]
    assert region_tuples(nested["result"], *SPAN) == [(0, 15, "Bank of America", "ORG"), (8, 15, "America", "LOC")]


def test_dropped_entities_are_counted_by_reason_in_metrics(make_client, llm):
    client = make_client()
    llm.replies.append(entities_reply([("Atlantis", "LOC"), ("Paris", "LOC"), ("Paris", "LOC"), ("Paris", "CITY")]))
    reasons = ("not_found", "repeated", "unknown_label")
    before = {reason: metric("llm_ner_dropped_entities_total", reason=reason) for reason in reasons}
    predict(client, ["Paris"])
    dropped = {reason: metric("llm_ner_dropped_entities_total", reason=reason) - before[reason] for reason in reasons}
    assert dropped == {"not_found": 1, "repeated": 1, "unknown_label": 1}  # Atlantis; the second Paris; CITY
    assert "llm_ner_dropped_entities_total" in client.get("/metrics").get_data(as_text=True)
