"""Long texts: chunks within the context budget, aligned per chunk, merged without duplicates at seams."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.spans.chunking import Chunk, align_chunks, split
from tests.strategies import documents

PROSE = (
    "Ada Lovelace met Charles Babbage in London. They wrote about the Analytical Engine.\n\n"
    "Later, Alan Turing worked at Bletchley Park near Milton Keynes; he met Ada Lovelace's readers.\n"
) * 20


def check_chunks(text, chunks, budget, overlap):
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for chunk in chunks:
        assert 0 < chunk.end - chunk.start <= budget
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start <= a.end  # no gap, always progress
        assert a.end - b.start <= overlap


def test_a_short_text_is_one_chunk():
    assert split("short text", budget=100, overlap=10) == [Chunk(0, 10)]


def test_prose_is_cut_after_a_break_and_chunks_overlap_from_a_word_start():
    chunks = split(PROSE, budget=500, overlap=80)
    check_chunks(PROSE, chunks, 500, 80)
    assert len(chunks) > 4
    for a, b in zip(chunks, chunks[1:]):
        assert PROSE[a.end - 1].isspace()  # cut after a break, never inside a word
        assert PROSE[b.start - 1].isspace() and not PROSE[b.start].isspace()
        assert a.end - b.start > 40  # a real overlap, not a token one


def test_text_without_spaces_is_cut_without_splitting_grapheme_clusters():
    text = "東京👨‍👩‍👧e\u0301\r\n" * 300
    chunks = split(text, budget=101, overlap=20)
    check_chunks(text, chunks, 101, 20)
    assert len(chunks) > 1
    for chunk in chunks[1:]:
        assert text[chunk.start] not in "\u200d\u0301\n"
        assert text[chunk.start - 1] != "\u200d"


@pytest.mark.parametrize("budget, overlap", [(0, 0), (10, 6), (10, -1)])
def test_a_budget_that_cannot_work_is_refused(budget, overlap):
    with pytest.raises(ValueError):
        split("x" * 50, budget=budget, overlap=overlap)


def oracle_answers(chunks, gold):
    """What an ideal LLM answers for each chunk: the gold entities wholly inside it, in order."""
    return [[(g[2], g[3]) for g in gold if c.start <= g[0] and g[1] <= c.end] for c in chunks]


def test_an_entity_seen_by_two_chunks_is_labelled_once():
    text = "intro words here. Ada Lovelace wrote notes. more words follow here"
    chunks = [Chunk(0, 44), Chunk(18, len(text))]
    result = align_chunks(text, chunks, [[("Ada Lovelace", "PER")], [("Ada Lovelace", "PER")]], label_all_mentions=False)
    assert [(s.start, s.text) for s in result.spans] == [(18, "Ada Lovelace")]
    assert not result.dropped


@pytest.mark.parametrize("allow_overlap", [False, True])
def test_an_entity_cut_by_a_seam_yields_to_the_whole_one_from_the_next_chunk(allow_overlap):
    text = "We flew to New York on Monday and stayed a week"
    chunks = [Chunk(0, 15), Chunk(7, len(text))]  # the first chunk ends inside "New York"
    result = align_chunks(text, chunks, [[("New", "LOC")], [("New York", "LOC")]], allow_overlap=allow_overlap)
    assert [(s.text, s.label) for s in result.spans] == [("New York", "LOC")]
    assert result.dropped == {"seam": 1}


def test_label_all_mentions_reaches_across_chunks():
    text = "Ada Lovelace wrote. " + "filler words only. " * 10 + "Ada Lovelace again."
    chunks = split(text, budget=100, overlap=30)
    answers = [[("Ada Lovelace", "PER")]] + [[] for _ in chunks[1:]]
    spans = align_chunks(text, chunks, answers).spans
    assert [s.start for s in spans] == [0, text.rindex("Ada")]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(documents(), min_size=1, max_size=6), st.integers(60, 300), st.booleans())
def test_chunked_oracle_answers_align_to_exactly_the_gold_spans(docs, budget, all_mentions):
    # documents joined into one long text; the overlap exceeds the longest entity
    text, gold = "", []
    for doc_text, doc_gold in docs:
        offset = len(text)
        gold += [(s + offset, e + offset, t, l) for s, e, t, l in doc_gold]
        text += doc_text + "\n\n"
    chunks = split(text, budget=budget, overlap=30)
    check_chunks(text, chunks, budget, 30)
    result = align_chunks(text, chunks, oracle_answers(chunks, gold), label_all_mentions=all_mentions)
    assert [(s.start, s.end, s.text, s.label) for s in result.spans] == gold


def test_an_overlap_larger_than_half_the_context_budget_is_a_configuration_error():
    from backend.infra.errors import ConfigError
    from backend.infra.settings import load_settings

    with pytest.raises(ConfigError, match="LLM_CHUNK_OVERLAP must be at most half of LLM_CONTEXT_CHARS"):
        load_settings(openai_api_key="x", llm_context_chars=1000, llm_chunk_overlap=600, _env_file=None)


def test_nested_entities_seen_by_two_chunks_stay_nested_when_overlap_is_allowed():
    text = "intro words here. Bank of America opened. more words follow here"
    # the first chunk sees "Bank of America" farther from its cut, the second sees "America" so
    chunks = [Chunk(0, 40), Chunk(14, len(text))]
    answer = [("Bank of America", "ORG"), ("America", "LOC")]
    result = align_chunks(text, chunks, [answer, answer], allow_overlap=True, label_all_mentions=False)
    assert [(s.text, s.label) for s in result.spans] == [("Bank of America", "ORG"), ("America", "LOC")]
    assert not result.dropped
