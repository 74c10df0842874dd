"""Hypothesis strategies shared by the alignment and chunking tests.

Texts are generated from entity surfaces and filler words joined by awkward separators; the gold
spans are where the entity surfaces were put.
"""

from __future__ import annotations

from hypothesis import strategies as st

SURFACES = [
    "Apple", "New York", "York", "New York State", "São Paulo", "Zoë", "Jose\u0301 Marti\u0301", "O'Brien",
    "AT&T", "C++", "R2-D2", "2024", "東京", "北京大学", "ירושלים", "القاهرة", "Ελλάδα", "Москва", "straße",
    "İstanbul", "🍎 Records", "👨‍👩‍👧 Club", "Dr. No", "U.S.", "ﬁnance", "Ｔｏｋｙｏ",
]
# fillers never hold an entity on word boundaries, but some hold one inside a longer word
FILLERS = [
    "the", "and", "met", "in", "said", "ok", "x1", "...", "🎉", "👍🏽", "é", "над", "は", "的", "—", "5%", "(", ")",
    "Pineapple", "Yorkshire", "NewYork", "12024", "AT&Tx", "Москвами", "Zoë́", "straßen", "Ελλάδας",
]
SEPARATORS = [" ", "  ", "\t", "\r\n", "\n\n", "\u00a0", ", ", " (", ") ", "\u200b", " \u2014 ", "; "]
LABELS = ["PER", "ORG", "LOC", "MISC"]

segment = st.one_of(
    st.tuples(st.just("entity"), st.sampled_from(SURFACES), st.sampled_from(LABELS)),
    st.tuples(st.just("filler"), st.sampled_from(FILLERS), st.just("")),
)


@st.composite
def documents(draw):
    """(text, gold spans [(start, end, surface, label)])."""
    parts = draw(st.lists(segment, max_size=30))
    text, gold = "", []
    for kind, surface, label in parts:
        if text:
            text += draw(st.sampled_from(SEPARATORS))
        if kind == "entity":
            gold.append((len(text), len(text) + len(surface), surface, label))
        text += surface
    return text, gold
