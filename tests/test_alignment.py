"""The alignment engine on the hard cases: every span lands on exactly the characters meant."""

import time

from backend.spans.alignment import Span, align, normalise


def spans(text, entities, **options):
    result = align(text, entities, **options)
    for span in result.spans:
        assert text[span.start : span.end] == span.text  # the invariant, on every call
    return [(s.start, s.end, s.text, s.label) for s in result.spans]


def test_exact_match_gives_original_offsets_and_text():
    text = "Tim Cook leads Apple."
    assert spans(text, [("Tim Cook", "PER"), ("Apple", "ORG")]) == [(0, 8, "Tim Cook", "PER"), (15, 20, "Apple", "ORG")]


def test_a_surface_never_matches_inside_a_longer_word():
    assert spans("Pineapple and Apples", [("Apple", "ORG")]) == []
    assert spans("Pineapple, Apple", [("Apple", "ORG")]) == [(11, 16, "Apple", "ORG")]


def test_digits_and_underscores_are_word_characters_too():
    assert spans("in 12024 and 2024", [("2024", "DATE")]) == [(13, 17, "2024", "DATE")]
    assert spans("my_var var", [("var", "X")]) == [(7, 10, "var", "X")]


def test_entities_made_of_punctuation_need_no_word_boundary():
    assert spans("He said !!! and C++ beats C.", [("C++", "MISC"), ("!!!", "MISC")], label_all_mentions=False) == [
        (8, 11, "!!!", "MISC"),
        (16, 19, "C++", "MISC"),
    ]


def test_entities_at_the_start_and_end_of_the_text():
    assert spans("Paris to Rome", [("Paris", "LOC"), ("Rome", "LOC")]) == [(0, 5, "Paris", "LOC"), (9, 13, "Rome", "LOC")]


def test_empty_text_and_empty_surfaces_give_nothing_and_count_the_drops():
    result = align("", [("Paris", "LOC"), ("  ", "LOC")])
    assert result.spans == [] and result.dropped == {"not_found": 1, "empty": 1}


def test_hallucinated_entities_are_dropped_and_counted():
    result = align("Madrid and Paris.", [("Berlin", "LOC"), ("Madrid", "LOC")])
    assert [s.text for s in result.spans] == ["Madrid"] and result.dropped["not_found"] == 1


def test_case_insensitive_match_keeps_the_texts_own_case():
    assert spans("the NEW YORK times", [("New York", "LOC")]) == [(4, 12, "NEW YORK", "LOC")]


def test_offsets_count_code_points_after_emoji_and_zwj_sequences():
    text = "👨‍👩‍👧 family 🎉 met Tim Cook 👍🏽 at Apple"
    got = spans(text, [("Tim Cook", "PER"), ("Apple", "ORG")])
    assert got == [(text.index("Tim"), text.index("Tim") + 8, "Tim Cook", "PER"), (len(text) - 5, len(text), "Apple", "ORG")]


def test_an_emoji_never_matches_inside_a_zwj_sequence_or_without_its_skin_tone():
    text = "👨‍👩‍👧 and 👍🏽"
    assert spans(text, [("👩", "X"), ("👍", "X")]) == []
    assert spans(text, [("👨‍👩‍👧", "X")]) == [(0, 5, "👨‍👩‍👧", "X")]


def test_combining_marks_decomposed_in_text_precomposed_in_answer():
    text = "Jose\u0301 Marti\u0301 visited Jose"
    assert spans(text, [("José Martí", "PER")], label_all_mentions=False) == [(0, 12, "Jose\u0301 Marti\u0301", "PER")]


def test_a_surface_never_stops_before_a_combining_mark():
    assert spans("Jose\u0301 left", [("Jose", "PER")]) == []


def test_crlf_tabs_double_and_non_breaking_spaces_match_a_single_space():
    text = "From New\r\nYork to Los\tAngeles via San  Jose and Las\u00a0Vegas."
    got = spans(text, [("New York", "LOC"), ("Los Angeles", "LOC"), ("San Jose", "LOC"), ("Las Vegas", "LOC")])
    assert [g[2] for g in got] == ["New\r\nYork", "Los\tAngeles", "San  Jose", "Las\u00a0Vegas"]


def test_curly_quotes_dashes_soft_hyphens_and_zero_width_characters():
    text = "“The Times” said Rolls–Royce and Micro\u00adsoft and Goo\u200bgle"
    got = spans(text, [('"The Times"', "ORG"), ("Rolls-Royce", "ORG"), ("Microsoft", "ORG"), ("Google", "ORG")])
    assert [g[2] for g in got] == ["“The Times”", "Rolls–Royce", "Micro\u00adsoft", "Goo\u200bgle"]


def test_straight_quotes_in_text_curly_in_answer():
    assert spans("O'Brien left", [("O’Brien", "PER")]) == [(0, 7, "O'Brien", "PER")]


def test_nfkc_compatibility_characters_fold_but_never_split():
    assert spans("the ﬁnance ministry", [("finance ministry", "ORG")]) == [(4, 19, "ﬁnance ministry", "ORG")]
    assert spans("Ｔｏｋｙｏ station", [("Tokyo", "LOC")]) == [(0, 5, "Ｔｏｋｙｏ", "LOC")]


def test_cjk_text_without_spaces_matches_inside_runs():
    text = "我住在北京。北京很大。"
    assert spans(text, [("北京", "LOC"), ("北京", "LOC")]) == [(3, 5, "北京", "LOC"), (6, 8, "北京", "LOC")]
    assert spans("東京都に住む", [("東京都", "LOC")]) == [(0, 3, "東京都", "LOC")]


def test_korean_names_match_before_attached_particles():
    assert spans("서울에서 만났다", [("서울", "LOC")]) == [(0, 2, "서울", "LOC")]


def test_right_to_left_scripts_and_bidi_marks():
    text = "שלום ירושלים\u200f وصل إلى القاهرة"
    got = spans(text, [("ירושלים", "LOC"), ("القاهرة", "LOC")])
    assert [g[2] for g in got] == ["ירושלים", "القاهرة"]
    # a bidi mark inside the answer (copied from a rendered page) is ignored
    assert spans("וירושלים ירושלים", [("\u200fירושלים", "LOC")]) == [(9, 16, "ירושלים", "LOC")]


def test_repeated_mentions_in_order_can_carry_different_labels():
    text = "Washington met Washington in Washington"
    entities = [("Washington", "PER"), ("Washington", "PER"), ("Washington", "LOC")]
    assert [g[3] for g in spans(text, entities)] == ["PER", "PER", "LOC"]


def test_a_mention_listed_more_often_than_it_occurs_is_dropped_as_repeated():
    result = align("Paris is nice", [("Paris", "LOC"), ("Paris", "LOC")])
    assert len(result.spans) == 1 and result.dropped == {"repeated": 1}


def test_an_item_listed_out_of_order_is_still_found():
    assert spans("Rome, then Paris", [("Paris", "LOC"), ("Rome", "LOC")]) == [(0, 4, "Rome", "LOC"), (11, 16, "Paris", "LOC")]


def test_label_all_mentions_on_labels_unlisted_mentions_of_a_listed_surface():
    text = "Apple sued Apple. Apple won."
    assert [g[0] for g in spans(text, [("Apple", "ORG")])] == [0, 11, 18]
    assert align(text, [("Apple", "ORG")]).added == 2


def test_label_all_mentions_off_labels_only_what_was_listed():
    assert [g[0] for g in spans("Apple sued Apple.", [("Apple", "ORG")], label_all_mentions=False)] == [0]


def test_label_all_mentions_skips_a_surface_the_llm_gave_two_labels():
    text = "Jordan met Jordan in Jordan"
    got = spans(text, [("Jordan", "PER"), ("Jordan", "LOC")])
    assert got == [(0, 6, "Jordan", "PER"), (11, 17, "Jordan", "LOC")]


def test_added_mentions_never_overlap_listed_spans():
    text = "York met New York"
    assert spans(text, [("York", "LOC"), ("New York", "LOC")]) == [(0, 4, "York", "LOC"), (9, 17, "New York", "LOC")]


def test_overlapping_listed_spans_longest_wins_by_default():
    result = align("Bank of America", [("America", "LOC"), ("Bank of America", "ORG")], label_all_mentions=False)
    assert [(s.text, s.label) for s in result.spans] == [("Bank of America", "ORG")]
    assert result.dropped == {"overlap": 1}


def test_overlap_rule_first_keeps_the_earlier_listed():
    result = align("Bank of America", [("America", "LOC"), ("Bank of America", "ORG")], label_all_mentions=False, prefer="first")
    assert [(s.text, s.label) for s in result.spans] == [("America", "LOC")]


def test_nested_spans_kept_when_the_config_allows_overlap():
    got = spans("Bank of America in America", [("Bank of America", "ORG"), ("America", "LOC"), ("America", "LOC")], allow_overlap=True)
    assert got == [(0, 15, "Bank of America", "ORG"), (8, 15, "America", "LOC"), (19, 26, "America", "LOC")]


def test_a_nested_listing_prefers_a_free_occurrence_when_overlap_is_not_allowed():
    text = "New York State and New York"
    assert spans(text, [("New York State", "LOC"), ("New York", "LOC")], label_all_mentions=False) == [
        (0, 14, "New York State", "LOC"),
        (19, 27, "New York", "LOC"),
    ]


def test_normalise_folds_case_width_quotes_dashes_and_spaces():
    assert normalise("  “ＡＢ”\u00a0–\tc\u200b ") == '"ab" - c'


def test_spans_are_span_objects_sorted_by_offset():
    result = align("b a", [("a", "X"), ("b", "X")])
    assert result.spans == [Span(0, 1, "b", "X"), Span(2, 3, "a", "X")]


def test_one_megabyte_text_aligns_with_every_span_exact():
    unit = "Ana Lima flew from São Paulo to “New\u00a0York” 🎉 with ACME\u2013Corp.\r\n"
    text = unit * (1_000_000 // len(unit) + 1)
    entities = [("Ana Lima", "PER"), ("São Paulo", "LOC"), ('"New York"', "LOC"), ("ACME-Corp", "ORG")]
    repeats = len(text) // len(unit)
    started = time.perf_counter()
    result = align(text, entities * repeats, label_all_mentions=False)
    elapsed = time.perf_counter() - started
    assert len(result.spans) == 4 * repeats and not result.dropped
    assert all(text[s.start : s.end] == s.text for s in result.spans)
    assert elapsed < 30  # a guard against quadratic blow-ups, not the speed target (see benchmarks/)


def test_a_name_right_after_or_before_a_zero_width_joiner_is_found():
    assert spans("\u200dLondon calling", [("London", "LOC")]) == [(1, 7, "London", "LOC")]
    assert spans("在\u200d北京", [("北京", "LOC")]) == [(2, 4, "北京", "LOC")]
    assert spans("北京\u200d在", [("北京", "LOC")]) == [(0, 2, "北京", "LOC")]
    assert spans("visit \u200dＬｏｎｄｏｎ", [("London", "LOC")]) == [(7, 13, "Ｌｏｎｄｏｎ", "LOC")]  # the normalised tier too
    assert spans("\u2060London and \u200bParis", [("\u200dLondon", "LOC"), ("Paris\u200b", "LOC")]) == [
        (1, 7, "London", "LOC"), (13, 18, "Paris", "LOC")]  # format characters at a surface's ends are no part of it
    # the joiner still glues what it joins: an emoji sequence, an Indic conjunct (virama + ZWJ)
    assert spans("👨\u200d👩 family", [("👩", "X")]) == []
    assert spans("क्\u200dष", [("ष", "X")]) == []


def test_label_all_mentions_never_marks_a_name_inside_a_longer_name():
    text = "中国人民银行称，中国经济向好。中国人民银行将继续"
    got = spans(text, [("中国", "LOC"), ("中国人民银行", "ORG")])
    assert got == [(0, 6, "中国人民银行", "ORG"), (8, 10, "中国", "LOC"), (15, 21, "中国人民银行", "ORG")]
    got = spans("York, then New York, then York", [("York", "LOC"), ("New York", "LOC")])
    assert got == [(0, 4, "York", "LOC"), (11, 19, "New York", "LOC"), (26, 30, "York", "LOC")]
    # off, what was listed stays where the walk put it
    assert spans(text, [("中国", "LOC"), ("中国人民银行", "ORG")], label_all_mentions=False) == [
        (0, 2, "中国", "LOC"), (15, 21, "中国人民银行", "ORG")]
