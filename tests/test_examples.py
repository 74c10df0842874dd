"""Choosing the few-shot examples for a new text: similar, covering the labels, diverse, within budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from backend.learning.selection import SHORTLIST, ExampleIndex, token_cost
from backend.ner.mentions import FewShotExample

LABELS = ("PER", "ORG", "LOC", "MISC")


def ex(text: str, *entities: tuple[str, str], task_id: int | None = None) -> FewShotExample:
    return FewShotExample(text, tuple(entities), task_id=task_id)


FOOTBALL = ex("Manchester United beat Arsenal at Old Trafford on Sunday.", ("Manchester United", "ORG"), ("Arsenal", "ORG"), ("Old Trafford", "LOC"))
POLITICS = ex("The senator met the prime minister in Ottawa.", ("Ottawa", "LOC"))
COOKING = ex("Stir the sauce slowly and add salt.")
NOVEL = ex("Sherlock Holmes solved the case with Watson.", ("Sherlock Holmes", "PER"), ("Watson", "PER"))
EURO = ex("The euro fell against the dollar.", ("euro", "MISC"))


def test_the_most_similar_example_is_chosen_and_placed_next_to_the_new_text():
    index = ExampleIndex([POLITICS, COOKING, FOOTBALL, NOVEL])
    chosen = index.select("Arsenal lost to Manchester United again.", LABELS, k=2, token_budget=10_000)
    assert chosen[-1] == FOOTBALL  # the closest sits last, right before the text to label


def test_every_label_is_shown_once_when_examples_allow_before_more_of_the_same():
    football_2 = ex("Chelsea beat Arsenal at Stamford Bridge.", ("Chelsea", "ORG"), ("Arsenal", "ORG"), ("Stamford Bridge", "LOC"))
    football_3 = ex("Arsenal and Chelsea drew at the Emirates.", ("Arsenal", "ORG"), ("Chelsea", "ORG"), ("Emirates", "LOC"))
    index = ExampleIndex([FOOTBALL, football_2, football_3, NOVEL, EURO, COOKING])
    chosen = index.select("Arsenal beat Chelsea.", LABELS, k=3, token_budget=10_000)
    labels_shown = {label for e in chosen for _, label in e.entities}
    assert labels_shown == {"PER", "ORG", "LOC", "MISC"}
    assert len(chosen) == 3


def test_near_duplicates_are_not_shown_twice():
    twin = ex("Manchester United beat Arsenal at Old Trafford on Sunday!", ("Manchester United", "ORG"), ("Arsenal", "ORG"), ("Old Trafford", "LOC"))
    index = ExampleIndex([FOOTBALL, twin, POLITICS, NOVEL])
    chosen = index.select("Manchester United beat Arsenal.", ("ORG", "LOC"), k=3, token_budget=10_000)
    assert not (FOOTBALL in chosen and twin in chosen)
    assert len(chosen) == 3


def test_the_examples_stay_within_the_token_budget_and_k():
    long_one = ex("Arsenal " * 2000, ("Arsenal", "ORG"))
    index = ExampleIndex([long_one, FOOTBALL, POLITICS, NOVEL, EURO, COOKING])
    budget = token_cost(FOOTBALL) + token_cost(POLITICS) + 5
    chosen = index.select("Arsenal played.", LABELS, k=4, token_budget=budget)
    assert long_one not in chosen
    assert sum(token_cost(e) for e in chosen) <= budget
    assert chosen and len(chosen) <= 4
    assert len(index.select("Arsenal played.", LABELS, k=2, token_budget=10**6)) == 2


def test_no_examples_when_k_is_zero_or_the_store_is_empty():
    assert ExampleIndex([FOOTBALL]).select("Arsenal", LABELS, k=0, token_budget=10_000) == []
    assert ExampleIndex([]).select("Arsenal", LABELS, k=3, token_budget=10_000) == []


def test_the_text_being_labeled_is_never_its_own_example():
    index = ExampleIndex([FOOTBALL, POLITICS])
    assert FOOTBALL not in index.select(FOOTBALL.text, LABELS, k=2, token_budget=10_000)


def test_texts_without_words_are_handled():
    index = ExampleIndex([ex("..."), ex("!!!"), COOKING])
    assert len(index.select("???", LABELS, k=2, token_budget=10_000)) == 2
    assert ExampleIndex([ex("..."), ex("!!!")]).select("Arsenal", LABELS, k=1, token_budget=10_000)


def test_bm25_relevance_equals_rank_bm25s_own_scores():
    from rank_bm25 import BM25Okapi

    from backend.learning.selection import tokens

    corpus = [FOOTBALL, POLITICS, COOKING, NOVEL, EURO, ex("Arsenal Arsenal Arsenal fans.")]
    index = ExampleIndex(corpus)
    reference = BM25Okapi([tokens(e.text) for e in corpus])
    for query in ("Arsenal beat Manchester United", "the euro and the dollar", "nothing matches zzz", "Arsenal Arsenal"):
        assert list(index.bm25_scores(query)) == pytest.approx(list(reference.get_scores(tokens(query))))


# ---- the vectorised shortlist picks exactly what the straightforward loop picks ----

WORDS = ["ada", "paris", "bank", "river", "acme", "court", "game", "song", "rome", "oslo"]


def reference_shortlist(index: ExampleIndex, text: str, labels, k: int) -> list[int]:
    """The loop the vectorised `_ranked` + `_shortlist` replace, kept as the specification."""
    relevance = index.relevance(text)
    ranked = sorted((i for i, e in enumerate(index.examples) if e.text != text), key=lambda i: -relevance[i])
    short = ranked[: SHORTLIST * k]
    per_label = {label: 0 for label in labels}
    for i in ranked[SHORTLIST * k:]:
        wanted = [label for label in index._labels[i] if per_label.get(label, SHORTLIST) < SHORTLIST]
        if wanted:
            short.append(i)
            for label in wanted:
                per_label[label] += 1
        if all(n >= SHORTLIST for n in per_label.values()):
            break
    return short


example_sets = st.lists(
    st.tuples(
        st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join),
        st.sets(st.sampled_from(LABELS + ("EVENT",)), max_size=3),
    ),
    min_size=1, max_size=120,
)


@hsettings(max_examples=200, deadline=None)
@given(example_sets, st.lists(st.sampled_from(WORDS), max_size=6).map(" ".join), st.integers(1, 5), st.booleans())
def test_the_shortlist_is_the_one_the_plain_loop_gives(stored, query, k, query_is_stored):
    examples = [FewShotExample(text, tuple((text.split()[0], label) for label in sorted(labels))) for text, labels in stored]
    index = ExampleIndex(examples)
    text = examples[0].text if query_is_stored else query
    fast = index._shortlist(index._ranked(index.relevance(text), text), LABELS, k)
    assert fast == reference_shortlist(index, text, LABELS, k)


def test_chinese_text_is_matched_by_character_pairs():
    from backend.learning.selection import tokens

    assert tokens("中美关系，IBM中国") == ["中美", "美关", "关系", "ibm", "中国"]
    trade = ex("中美两国的贸易额增长了百分之十二。", ("中", "LOC"), ("美", "LOC"))
    sport = ex("姚明曾效力于休斯敦火箭队。", ("姚明", "PER"), ("休斯敦火箭队", "ORG"))
    weather = ex("今天北京的天气晴朗。", ("北京", "LOC"))
    index = ExampleIndex([sport, weather, trade])
    # the closest sits last; with a whole clause as one word, nothing would be close to anything
    assert index.select("中日两国的贸易额大幅增长。", LABELS, k=3, token_budget=10_000)[-1] == trade
    assert index.select("易建联也曾效力于火箭队。", LABELS, k=3, token_budget=10_000)[-1] == sport
