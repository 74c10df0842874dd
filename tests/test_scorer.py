"""Entity-level P/R/F1 (nervaluate): strict and partial, per label, micro and macro."""

from __future__ import annotations

import pytest

from backend.tools.conll import build_units, read_conll
from backend.tools.scorer import format_table, score
from tests.conftest import WIKIGOLD

GOLD = [[(0, 5, "PER"), (10, 15, "LOC")], [(3, 8, "ORG")]]
PRED = [[(0, 5, "PER"), (10, 13, "LOC"), (20, 25, "ORG")], []]


def test_perfect_predictions_score_one_everywhere():
    report = score(GOLD, GOLD)
    for scheme in ("strict", "partial"):
        assert report.micro[scheme].f1 == report.macro[scheme].f1 == 1.0
        assert all(report.per_label[label][scheme].f1 == 1.0 for label in ("PER", "LOC", "ORG"))


def test_strict_and_partial_figures_by_hand():
    report = score(GOLD, PRED)
    strict, partial = report.micro["strict"], report.micro["partial"]
    # strict: PER right; LOC boundary wrong (incorrect); ORG in text 1 spurious; ORG in text 2 missed
    assert (strict.correct, strict.incorrect, strict.spurious, strict.missed) == (1, 1, 1, 1)
    assert strict.precision == pytest.approx(1 / 3)
    assert strict.recall == pytest.approx(1 / 3)
    # partial: the LOC overlap counts half
    assert partial.partial == 1
    assert partial.precision == pytest.approx(1.5 / 3)
    assert partial.recall == pytest.approx(1.5 / 3)
    assert report.per_label["PER"]["strict"].f1 == 1.0
    assert report.per_label["LOC"]["strict"].f1 == 0.0
    assert report.per_label["LOC"]["partial"].f1 == pytest.approx(0.5)
    assert report.per_label["ORG"]["strict"].f1 == 0.0
    assert report.macro["strict"].f1 == pytest.approx((1 + 0 + 0) / 3)
    assert report.macro["partial"].f1 == pytest.approx((1 + 0.5 + 0) / 3)
    assert (report.gold_entities, report.predicted_entities) == (3, 3)


def test_a_wrong_label_on_right_boundaries_is_strict_wrong_and_partial_right():
    report = score([[(0, 3, "PER")]], [[(0, 3, "ORG")]])
    assert report.micro["strict"].f1 == 0.0
    assert report.micro["partial"].f1 == 1.0


def test_labels_limit_the_evaluation():
    report = score(GOLD, PRED, labels=["PER"])
    assert report.labels == ["PER"]
    assert report.micro["strict"].f1 == 1.0


def test_a_label_absent_from_gold_and_predictions_does_not_lower_the_macro_average():
    report = score([[(0, 3, "PER")]], [[(0, 3, "PER")]], labels=["PER", "LOC", "MISC"])
    assert report.labels == ["PER"]
    assert report.macro["strict"].f1 == 1.0


def test_no_texts_or_no_entities_score_zero_without_error():
    assert score([], []).micro["strict"].f1 == 0.0
    report = score([[]], [[]])
    assert report.micro["strict"].precision == 0.0 and report.labels == []
    assert "micro" in format_table(report)


def test_mismatched_document_counts_are_refused():
    with pytest.raises(ValueError, match="2 gold documents but 1 predicted"):
        score(GOLD, PRED[:1])


def test_table_lists_each_label_then_micro_and_macro():
    table = format_table(score(GOLD, PRED))
    rows = [line.split()[0] for line in table.splitlines()[2:]]
    assert rows[:3] == ["LOC", "ORG", "PER"] and "micro" in rows and "macro" in rows
    assert "0.333" in table


def test_wikigold_gold_against_itself_minus_one_label_counts_that_label_missed():
    units = build_units(read_conll(WIKIGOLD))
    gold = [[(e.start, e.end, e.label) for e in u.entities] for u in units]
    pred = [[s for s in doc if s[2] != "MISC"] for doc in gold]
    report = score(gold, pred)
    misc = sum(1 for doc in gold for s in doc if s[2] == "MISC")
    assert report.per_label["MISC"]["strict"].missed == misc
    assert report.per_label["PER"]["strict"].f1 == 1.0
    assert report.micro["strict"].precision == 1.0
    assert report.micro["strict"].recall == pytest.approx((3558 - misc) / 3558)
