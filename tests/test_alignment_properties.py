"""Property-based specification of the alignment engine (Hypothesis).

Texts are generated from entity surfaces and filler words joined by awkward separators (see
tests/strategies.py); the gold spans are where the entity surfaces were put. An answer listing every gold entity in order (the
documented mention rule) must align back to exactly the gold spans.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.spans import alignment
from backend.spans.alignment import align
from tests.strategies import LABELS, documents


def aligned(text, entities, **options):
    return [(s.start, s.end, s.text, s.label) for s in align(text, entities, **options).spans]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.booleans(), st.sampled_from([0, 64]))
def test_an_answer_listing_every_gold_mention_in_order_aligns_to_exactly_the_gold_spans(document, all_mentions, scans):
    text, gold = document
    answer = [(surface, label) for _, _, surface, label in gold]
    # both search paths: plain whole-text searches, and the word index used after many of them
    saved, alignment._PLAIN_SCANS, alignment._NEAR = alignment._PLAIN_SCANS, scans, 20_000 if scans else 0
    try:
        assert aligned(text, answer, label_all_mentions=all_mentions) == gold
    finally:
        alignment._PLAIN_SCANS, alignment._NEAR = saved, 20_000


def _perturb(surface: str, how: int) -> str:
    if how == 0:
        return surface.upper()
    if how == 1:
        return surface.lower()
    if how == 2:
        return surface.replace(" ", "   ")
    return surface.replace("'", "\u2019")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.data())
def test_an_answer_with_changed_case_spacing_or_quotes_still_aligns_to_the_gold_spans(document, data):
    text, gold = document
    answer = [(_perturb(surface, data.draw(st.integers(0, 3))), label) for _, _, surface, label in gold]
    assert aligned(text, answer, label_all_mentions=False) == gold


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=200),
    st.lists(st.tuples(st.text(max_size=12), st.sampled_from(LABELS)), max_size=12),
    st.booleans(),
    st.booleans(),
)
def test_any_answer_on_any_text_gives_exact_sorted_spans(text, answer, all_mentions, overlap):
    # the LLM's surfaces are arbitrary strings here; half of them are cut from the text itself
    answer = answer + [(text[i : i + 7], "PER") for i in range(0, len(text), 13)]
    result = align(text, answer, label_all_mentions=all_mentions, allow_overlap=overlap)
    for span in result.spans:
        assert 0 <= span.start < span.end <= len(text)
        assert text[span.start : span.end] == span.text
    assert result.spans == sorted(result.spans)
    if not overlap:
        assert all(a.end <= b.start for a, b in zip(result.spans, result.spans[1:]))
    listed = len(answer)
    assert len(result.spans) - result.added + sum(result.dropped.values()) == listed
