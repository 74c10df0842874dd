"""Alignment of what LLMs answer on Chinese text: width variants, script variants, spaces and
punctuation around surfaces, one-character names and the occurrence hints that place them."""

from __future__ import annotations

import pytest

from backend.ner.task import occurrence_context
from backend.spans.alignment import align
from backend.spans.chunking import align_chunks, split


def found(text, entities, **options) -> list[tuple[int, int, str, str]]:
    result = align(text, entities, **options)
    for span in result.spans:
        assert text[span.start:span.end] == span.text
    return [(s.start, s.end, s.text, s.label) for s in result.spans]


# ---- what the model writes differs from the text ----
@pytest.mark.parametrize(
    "text, surface, expected",
    [
        ("１９９７年，香港回归。", "1997年", "１９９７年"),  # full-width digits in the text, ASCII in the answer
        ("1997年，香港回归。", "１９９７年", "1997年"),  # and the other way round
        ("他加入了ＩＢＭ中国研究院。", "IBM中国研究院", "ＩＢＭ中国研究院"),  # full-width Latin letters
        ("他加入了IBM中国研究院。", "ｉｂｍ中国研究院", "IBM中国研究院"),  # full-width and another case
    ],
)
def test_full_width_and_half_width_digits_and_letters_find_each_other(text, surface, expected):
    result = align(text, [(surface, "ORG")], label_all_mentions=False)
    assert [s.text for s in result.spans] == [expected]
    assert result.matched == {"normalised": 1}


@pytest.mark.parametrize(
    "text, surface",
    [("臺灣大學的學生", "台湾大学"), ("台湾大学的学生", "臺灣大學"), ("国务院发布通知", "國務院")],
)
def test_traditional_and_simplified_characters_are_different_text(text, surface):
    result = align(text, [(surface, "ORG")])
    assert result.spans == [] and result.dropped == {"not_found": 1}


def test_of_both_scripts_in_one_text_only_the_one_written_is_found():
    assert found("台湾与臺灣", [("臺灣", "LOC")]) == [(3, 5, "臺灣", "LOC")]


@pytest.mark.parametrize("surface", [" 北京 ", "\u3000北京", "北京\u3000\u3000", "\t北京\n"])
def test_spaces_the_model_adds_around_a_surface_are_ignored(surface):
    assert found("我在北京工作。", [(surface, "LOC")]) == [(2, 4, "北京", "LOC")]


@pytest.mark.parametrize("surface", ["北京。", "，北京", "北京、", "北京！", "：北京；", "北京，"])
def test_chinese_sentence_punctuation_at_a_surface_edge_is_left_out(surface):
    assert found("他说：北京、上海！", [(surface, "LOC")], label_all_mentions=False) == [(3, 5, "北京", "LOC")]


def test_punctuation_only_surfaces_are_empty():
    result = align("他说：北京。", [("。", "LOC"), ("，", "LOC")])
    assert result.spans == [] and result.dropped == {"empty": 2}


def test_brackets_and_quotes_stay_as_the_model_wrote_them_and_need_no_boundary():
    text = "《人民日报》报道，“中法友谊”长存，星海科技（上海）有限公司成立。"
    assert found(text, [("《人民日报》", "ORG")]) == [(0, 6, "《人民日报》", "ORG")]
    assert found(text, [("人民日报", "ORG")]) == [(1, 5, "人民日报", "ORG")]
    assert found(text, [("星海科技（上海）有限公司", "ORG")], label_all_mentions=False) == [(18, 30, "星海科技（上海）有限公司", "ORG")]
    assert found(text, [("上海", "LOC")]) == [(23, 25, "上海", "LOC")]


# ---- one-character names ----
TRAP = "在过去的五年中，中美关系经历了起伏。"  # the first 中 ends the word 年中, the second is China


def test_without_a_hint_the_next_occurrence_of_a_one_character_name_can_be_inside_a_word():
    # the mention rule's limit, kept as it is: a (text, label) list cannot say which 中 it means
    assert found(TRAP, [("中", "LOC"), ("美", "LOC")], label_all_mentions=False) == [
        (6, 7, "中", "LOC"), (9, 10, "美", "LOC")
    ]


# the last context holds two 中: the one nearer its middle is the mention it was copied around
@pytest.mark.parametrize("context", ["中美关系", "，中美", "中美", "五年中，中美关系经历"])
def test_an_occurrence_hint_places_the_name_where_the_model_saw_it(context):
    result = align(TRAP, [("中", "LOC", context), ("美", "LOC", "中美关系")], label_all_mentions=False)
    assert [(s.start, s.text) for s in result.spans] == [(8, "中"), (9, "美")]
    assert result.hinted == 2


def test_a_hint_in_another_width_is_found_in_the_folded_text():
    text = "２０２４年中，中美会谈在北京举行。"
    result = align(text, [("中", "LOC", "2024年中，中美会谈"), ("中", "LOC", "，中美")], label_all_mentions=False)
    # the first hint holds two 中: the walk takes the first free one (年中), as the model listed two
    assert [s.start for s in result.spans] == [5, 7] and result.hinted == 2
    result = align(text, [("中", "LOC", "，中美"), ("美", "LOC", "中美会谈")], label_all_mentions=False)
    assert [(s.start, s.text) for s in result.spans] == [(7, "中"), (8, "美")]


def test_a_hint_that_is_not_in_the_text_or_points_at_a_taken_mention_falls_back_to_the_walk():
    assert found(TRAP, [("中", "LOC", "中日关系")], label_all_mentions=False) == [(6, 7, "中", "LOC")]
    twice = align(TRAP, [("中", "LOC", "中美"), ("中", "LOC", "中美")], label_all_mentions=False)
    assert [s.start for s in twice.spans] == [6, 8] and twice.hinted == 1


def test_repeated_contexts_place_each_mention_in_order():
    text = "年中时，中美谈判；月中时，中美再谈。"
    entities = [("中", "LOC", "，中美"), ("美", "LOC", None), ("中", "LOC", "，中美"), ("美", "LOC", None)]
    assert [s.start for s in align(text, entities, label_all_mentions=False).spans] == [4, 5, 13, 14]


def test_a_hint_never_changes_a_surface_found_where_it_says():
    text = "Washington met Washington in Washington."
    plain = align(text, [("Washington", "PER"), ("Washington", "LOC")], label_all_mentions=False)
    hinted = align(text, [("Washington", "PER", "met Washington in"), ("Washington", "LOC", "in Washington.")], label_all_mentions=False)
    assert [(s.start, s.label) for s in plain.spans] == [(0, "PER"), (15, "LOC")]
    assert [(s.start, s.label) for s in hinted.spans] == [(15, "PER"), (29, "LOC")]


def test_hints_work_inside_chunks_of_a_long_text():
    text = "在过去的五年中，中美关系经历了起伏。" * 40
    chunks = split(text, 200, 40)
    assert len(chunks) > 1
    gold = [i for i in range(len(text)) if text[i:i + 2] == "中美" or text[i - 1:i + 1] == "中美"]
    # what the model sees is its chunk: its hints are copied from there
    answers = [
        [(text[i], "LOC", occurrence_context(text[c.start:c.end], i - c.start, i - c.start + 1)) for i in gold if c.start <= i < c.end]
        for c in chunks
    ]
    result = align_chunks(text, chunks, answers, label_all_mentions=False)
    assert [s.start for s in result.spans] == gold
    assert result.hinted == sum(map(len, answers))


def test_occurrence_context_widens_until_it_occurs_once():
    assert occurrence_context(TRAP, 8, 9) == "中，中美关"
    text = "中美，中美，中美关系。"
    context = occurrence_context(text, 6, 7)
    assert text.count(context) == 1 and context.index("中") + text.index(context) == 6


# ---- LABEL_ALL_MENTIONS and one-character names ----
def test_all_mentions_does_not_add_a_one_character_name_touching_chinese_letters():
    text = "在过去的五年中，中美关系经历了起伏，美好的日子。"
    spans = found(text, [("中", "LOC", "中美关系"), ("美", "LOC", "中美关系")], label_all_mentions=True)
    assert spans == [(8, 9, "中", "LOC"), (9, 10, "美", "LOC")]


def test_all_mentions_adds_a_one_character_name_standing_alone_and_longer_names_anywhere():
    text = "中美关系：中、美两国，北京与上海；北京市内，美。"
    spans = found(text, [("中", "LOC"), ("美", "LOC"), ("北京", "LOC")], label_all_mentions=True)
    # 美 of 美两国 touches 两: left out; 中 between ： and 、 and the last 美 stand alone: added
    assert spans == [
        (0, 1, "中", "LOC"), (1, 2, "美", "LOC"), (5, 6, "中", "LOC"),
        (11, 13, "北京", "LOC"), (17, 19, "北京", "LOC"), (22, 23, "美", "LOC"),
    ]


def test_one_letter_names_of_spaced_scripts_are_added_as_before():
    assert found("X said X. Then X left.", [("X", "PER")]) == [(0, 1, "X", "PER"), (7, 8, "X", "PER"), (15, 16, "X", "PER")]
