"""Reading CoNLL in every common variant, building task texts with exact spans, and writing tags back."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.tools.conll import (
    JOINS,
    ConllError,
    TokenRun,
    build_units,
    decode,
    encode,
    labels_of,
    read_conll,
    read_files,
    write_conll,
)
from tests.conftest import WIKIGOLD, ZH_DATA


def write(tmp_path: Path, content: str | bytes, name: str = "data.conll") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def spans(unit) -> list[tuple[str, str]]:
    return [(e.text, e.label) for e in unit.entities]


def independent_entity_count(path: Path) -> int:
    """Counted straight from the tag column: an entity starts at B-, or at I- after another type or O."""
    count, previous = 0, "O"
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            previous = "O"
            continue
        tag = parts[-1]
        if tag.startswith("B-") or (tag.startswith("I-") and previous[2:] != tag[2:]):
            count += 1
        previous = tag
    return count


# ---- real data ----
def test_wikigold_reads_as_145_documents_in_iob1_with_every_span_exact():
    documents = read_conll(WIKIGOLD)
    assert len(documents) == 145
    assert sum(len(d.sentences) for d in documents) == 1696
    assert labels_of(documents) == ["LOC", "MISC", "ORG", "PER"]
    units = build_units(documents)
    assert len(units) == 145
    assert sum(len(u.entities) for u in units) == independent_entity_count(WIKIGOLD) == 3558
    for unit in units:
        for entity in unit.entities:
            assert unit.text[entity.start:entity.end] == entity.text
    first = units[0]
    assert first.text.startswith("010 is the tenth album from Japanese Punk Techno band The Mad Capsule Markets .\nThis")
    assert spans(first)[:3] == [("010", "MISC"), ("Japanese", "MISC"), ("The Mad Capsule Markets", "ORG")]


def test_wikigold_round_trip_conll_to_spans_to_tags_gives_back_the_same_tags(tmp_path):
    documents = read_conll(WIKIGOLD)
    units = build_units(documents, per="sentence")
    out = tmp_path / "round.conll"
    write_conll(out, units, [[(e.start, e.end, e.label) for e in u.entities] for u in units], scheme="IOB1")
    again = read_conll(out)
    assert len(again) == len(documents)
    for old, new in zip(documents, again):
        for old_sentence, new_sentence in zip(old.sentences, new.sentences, strict=True):
            assert new_sentence.words == old_sentence.words
            assert [line.split()[1] for line in _lines_of(out, new_sentence)] == old_sentence.tags  # gold column
            assert new_sentence.tags == old_sentence.tags  # the predicted column, written from the spans


def _lines_of(path: Path, sentence) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    return [lines[t.line - 1] for t in sentence.tokens]


# ---- variants ----
CONLL2003_SHAPE = """-DOCSTART- -X- -X- O

Ada NNP B-NP B-PER
Lovelace NNP I-NP I-PER
visited VBD B-VP O
Kings NNP B-NP B-LOC
Cross NNP I-NP I-LOC
. . O O

Babbage NNP B-NP B-PER
agreed VBD B-VP O

-DOCSTART- -X- -X- O

The DT B-NP O
Royal NNP I-NP B-ORG
Society NNP I-NP I-ORG
met VBD B-VP O
"""


def test_four_columns_iob2_with_docstart_at_document_starts(tmp_path):
    documents = read_conll(write(tmp_path, CONLL2003_SHAPE))
    assert len(documents) == 2
    units = build_units(documents)
    assert units[0].text == "Ada Lovelace visited Kings Cross .\nBabbage agreed"
    assert spans(units[0]) == [("Ada Lovelace", "PER"), ("Kings Cross", "LOC"), ("Babbage", "PER")]
    assert spans(units[1]) == [("Royal Society", "ORG")]


def test_per_sentence_gives_one_task_per_sentence_with_its_own_offsets(tmp_path):
    units = build_units(read_conll(write(tmp_path, CONLL2003_SHAPE)), per="sentence")
    assert [u.text for u in units] == ["Ada Lovelace visited Kings Cross .", "Babbage agreed", "The Royal Society met"]
    assert [(e.start, e.end) for e in units[1].entities] == [(0, 7)]
    assert len({u.key for u in units}) == 3


def test_docstart_at_document_ends_and_crlf_and_no_final_newline(tmp_path):
    content = "Ada B-PER\r\nsmiled O\r\n\r\n-DOCSTART- O\r\n\r\nParis B-LOC\r\nwaited O\r\n\r\n-DOCSTART- O"
    units = build_units(read_conll(write(tmp_path, content)))
    assert [u.text for u in units] == ["Ada smiled", "Paris waited"]
    assert [spans(u) for u in units] == [[("Ada", "PER")], [("Paris", "LOC")]]


def test_no_docstart_makes_the_file_one_document_and_a_bom_is_ignored(tmp_path):
    content = "\ufeffAda\tB-PER\nsmiled\tO\n\nParis\tB-LOC\n"
    documents = read_conll(write(tmp_path, content))
    assert len(documents) == 1
    assert build_units(documents)[0].text == "Ada smiled\nParis"


def test_bioes_and_bilou_tags_decode_to_the_same_spans(tmp_path):
    bioes = "New\tB-LOC\nYork\tI-LOC\nCity\tE-LOC\nand\tO\nAda\tS-PER\n"
    bilou = "New B-LOC\nYork I-LOC\nCity L-LOC\nand O\nAda U-PER\n"
    a = build_units(read_conll(write(tmp_path, bioes, "a.conll")))[0]
    b = build_units(read_conll(write(tmp_path, bilou, "b.conll")))[0]
    assert spans(a) == spans(b) == [("New York City", "LOC"), ("Ada", "PER")]


def test_any_tag_set_including_wnut_types_with_hyphens(tmp_path):
    content = "Watching\tO\nStar\tB-creative-work\nWars\tI-creative-work\nwith\tO\n@ada\tB-person\n"
    documents = read_conll(write(tmp_path, content))
    assert labels_of(documents) == ["creative-work", "person"]
    assert spans(build_units(documents)[0]) == [("Star Wars", "creative-work"), ("@ada", "person")]


def test_iob1_adjacent_entities_of_one_type_are_split_by_b():
    assert decode(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]) == [
        TokenRun(0, 2, "PER"), TokenRun(2, 3, "PER"), TokenRun(4, 5, "LOC"), TokenRun(5, 6, "ORG")
    ]


def test_unicode_tokens_keep_code_point_offsets(tmp_path):
    units = build_units(read_conll(write(tmp_path, "🎉 O\nZoë B-PER\nQuéré I-PER\n")))
    (entity,) = units[0].entities
    assert (entity.start, entity.end, entity.text) == (2, 11, "Zoë Quéré")


def test_several_files_read_together(tmp_path):
    a = write(tmp_path, "Ada B-PER\n", "a.conll")
    b = write(tmp_path, "Paris B-LOC\n", "b.conll")
    units = build_units(read_files([a, b]))
    assert [(u.source, u.text) for u in units] == [("a.conll", "Ada"), ("b.conll", "Paris")]
    assert units[0].key != units[1].key


# ---- malformed files: file:line: what is wrong ----
@pytest.mark.parametrize(
    "content, line, words",
    [
        ("Ada B-PER\nsmiled\n", 2, "one column"),
        ("Ada B-PER\nsmiled X-PER\n", 2, "'X-PER'"),
        ("Ada B-PER\nsmiled B-\n", 2, "'B-'"),
        ("Ada NNP B-PER\nsmiled O\n", 2, "2 columns, but line 1 has 3"),
        ("\n\n-DOCSTART- O\n\n", 1, "no tokens"),
    ],
)
def test_a_malformed_file_is_reported_with_file_and_line(tmp_path, content, line, words):
    path = write(tmp_path, content)
    with pytest.raises(ConllError) as error:
        read_conll(path)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: ")
    assert words in message


def test_a_file_that_is_not_utf8_is_reported_with_its_line(tmp_path):
    path = write(tmp_path, b"Ada B-PER\nZo\xeb B-PER\n")
    with pytest.raises(ConllError, match=rf"^{path}:2: not UTF-8"):
        read_conll(path)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConllError, match="cannot read"):
        read_conll(tmp_path / "nope.conll")


# ---- writing ----
def test_predicted_spans_cutting_a_token_tag_the_whole_token(tmp_path):
    unit = build_units(read_conll(write(tmp_path, "Obama's O\nvisit O\n")))[0]
    out = tmp_path / "out.conll"
    write_conll(out, [unit], [[(0, 5, "PER")]])
    assert out.read_text().splitlines() == ["Obama's O B-PER", "visit O O", ""]


# ---- property: any tags in any scheme survive CoNLL -> spans -> CoNLL ----
words = st.text(alphabet=st.characters(categories=["L", "N", "P", "S"]), min_size=1, max_size=6)


@st.composite
def tagged_sentence(draw):
    n = draw(st.integers(1, 12))
    tokens = [draw(words) for _ in range(n)]
    entities, i = [], 0
    while i < n:
        if draw(st.booleans()):
            size = draw(st.integers(1, min(3, n - i)))
            entities.append(TokenRun(i, i + size, draw(st.sampled_from(["PER", "LOC", "creative-work"]))))
            i += size
        else:
            i += 1
    return tokens, entities


# characters of every script, Chinese and full-width forms among them, one to six to a token
cjk_words = st.text(alphabet=st.sampled_from("中美关系日本東京にタイไทย１９Ａa1，。·（）"), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(tagged_sentence(), min_size=1, max_size=4),
    st.sampled_from(["IOB1", "IOB2", "BIOES", "BMES"]),
    st.sampled_from(JOINS),
)
def test_round_trip_in_every_scheme_gives_back_the_same_entities(tmp_path_factory, sentences, scheme, join):
    tmp = tmp_path_factory.mktemp("prop")
    text = "\n\n".join("\n".join(f"{t}\t{tag}" for t, tag in zip(toks, encode(len(toks), ents, scheme))) for toks, ents in sentences)
    documents = read_conll(write(tmp, text))
    assert [decode(s.tags) for s in documents[0].sentences] == [ents for _, ents in sentences]
    unit = build_units(documents, join=join)[0]
    for sentence, offsets in zip(unit.sentences, unit.token_spans):
        assert [unit.text[a:b] for a, b in offsets] == sentence.words
    for entity in unit.entities:
        assert unit.text[entity.start:entity.end] == entity.text
    out = tmp / "out.conll"
    write_conll(out, [unit], [[(e.start, e.end, e.label) for e in unit.entities]], scheme=scheme)
    again = read_conll(out)
    assert [s.tags for s in again[0].sentences] == [encode(len(t), e, scheme) for t, e in sentences]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(cjk_words, min_size=1, max_size=10), min_size=1, max_size=3), st.sampled_from(JOINS))
def test_any_join_keeps_every_token_at_its_offsets_and_only_joins_with_nothing_or_one_space(tmp_path_factory, sentences, join):
    tmp = tmp_path_factory.mktemp("join")
    path = write(tmp, "\n\n".join("\n".join(f"{t} O" for t in tokens) for tokens in sentences))
    (unit,) = build_units(read_conll(path), join=join)
    for tokens, offsets in zip(sentences, unit.token_spans, strict=True):
        assert [unit.text[a:b] for a, b in offsets] == tokens
        assert all(unit.text[b:a2] in ("", " ") for (_, b), (a2, _) in zip(offsets, offsets[1:]))
        if join == "none":
            assert all(b == a2 for (_, b), (a2, _) in zip(offsets, offsets[1:]))


# ---- Chinese and other scripts written without spaces ----
ZH_SAMPLE = [
    ("新华社北京１２月３日电，中美两国代表在华盛顿举行会谈。",
     [("新华社", "ORG"), ("北京", "LOC"), ("中", "LOC"), ("美", "LOC"), ("华盛顿", "LOC")]),
    ("1997年，张伟加入IBM中国研究院。", [("张伟", "PER"), ("IBM中国研究院", "ORG")]),
    ("姚明曾效力于ＮＢＡ休斯敦火箭队。", [("姚明", "PER"), ("ＮＢＡ", "ORG"), ("休斯敦火箭队", "ORG")]),
    ("联合国秘书长安东尼奥·古特雷斯呼吁各方保持克制。", [("联合国", "ORG"), ("安东尼奥·古特雷斯", "PER")]),
    ("星海科技（上海）有限公司宣布在深圳设立研发中心。", [("星海科技（上海）有限公司", "ORG"), ("深圳", "LOC")]),
]


def test_a_chinese_character_per_line_file_becomes_text_without_spaces_with_exact_gold():
    path = ZH_DATA / "sample.bio.conll"
    units = build_units(read_conll(path), per="sentence")
    assert [(u.text, spans(u)) for u in units] == ZH_SAMPLE
    for unit in units:
        for entity in unit.entities:
            assert unit.text[entity.start:entity.end] == entity.text
    assert len({u.key for u in units}) == len(units)
    (document,) = build_units(read_conll(path))
    assert document.text == "\n".join(text for text, _ in ZH_SAMPLE)
    assert spans(document) == [entity for _, entities in ZH_SAMPLE for entity in entities]
    # the key is computed from the text: the same reading gives the same keys, another join other keys
    assert [u.key for u in build_units(read_conll(path), per="sentence")] == [u.key for u in units]
    assert {u.key for u in build_units(read_conll(path), per="sentence", join="space")}.isdisjoint(u.key for u in units)


def test_join_space_and_none_override_the_automatic_choice(tmp_path):
    path = ZH_DATA / "sample.bio.conll"
    spaced = build_units(read_conll(path), per="sentence", join="space")[1]
    assert spaced.text == "1 9 9 7 年 ， 张 伟 加 入 I B M 中 国 研 究 院 。"
    assert spans(spaced) == [("张 伟", "PER"), ("I B M 中 国 研 究 院", "ORG")]
    english = write(tmp_path, "Ada B-PER\nLovelace I-PER\nsmiled O\n")
    assert build_units(read_conll(english), join="none")[0].text == "AdaLovelacesmiled"
    assert build_units(read_conll(english))[0].text == "Ada Lovelace smiled"


def test_bmes_reads_like_bioes_and_is_written_back_tag_for_tag(tmp_path):
    path = ZH_DATA / "resume.bmes.conll"
    documents = read_conll(path)
    units = build_units(documents, per="sentence")
    assert [spans(u) for u in units] == [
        [("王小明", "NAME"), ("汉族", "RACE"), ("清华大学", "EDU")],
        [("ＡＢＣ科技有限公司", "ORG"), ("首席执行官", "TITLE"), ("星海科技（上海）有限公司", "ORG"), ("技术总监", "TITLE")],
        [("李", "NAME"), ("中国国籍", "CONT"), ("MBA", "EDU"), ("高级工程师", "TITLE")],
    ]
    assert units[2].text == "李先生，中国国籍，MBA学历，高级工程师。"
    assert decode(["B-NAME", "M-NAME", "E-NAME", "S-NAME", "O"]) == [TokenRun(0, 3, "NAME"), TokenRun(3, 4, "NAME")]
    out = tmp_path / "out.conll"
    write_conll(out, units, [[(e.start, e.end, e.label) for e in u.entities] for u in units], scheme="BMES")
    written = [line.split() for line in out.read_text(encoding="utf-8").splitlines() if line]
    original = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line]
    assert [[token, gold] for token, gold, _ in written] == original
    assert [predicted for _, _, predicted in written] == [tag for _, tag in original]


def test_word_segmented_text_gets_no_space_next_to_an_unspaced_script_only(tmp_path):
    japanese = write(tmp_path, "東京 B-LOC\nに O\n住む O\nJohn B-PER\nSmith I-PER\n。 O\n", "ja.conll")
    (unit,) = build_units(read_conll(japanese))
    assert unit.text == "東京に住むJohn Smith。"
    assert spans(unit) == [("東京", "LOC"), ("John Smith", "PER")]
    chinese = write(tmp_path, "我们 O\n在 O\n北京 B-LOC\n使用 O\nWindows B-MISC\nXP I-MISC\n系统 O\n", "zh.conll")
    assert build_units(read_conll(chinese))[0].text == "我们在北京使用Windows XP系统"
    # Korean is written with spaces between words: its word-level files keep them
    korean = write(tmp_path, "서울에서 B-LOC\n살았다 O\n", "ko.conll")
    assert build_units(read_conll(korean))[0].text == "서울에서 살았다"


def test_character_per_line_files_keep_a_space_only_between_two_whole_words(tmp_path):
    tokens = "我 们 使 用 Windows XP 系 统 ， 由 B B C 在 2 0 2 4 年 报 道".split()
    tags = {"Windows": "B-MISC", "XP": "I-MISC"}
    content = "".join(f"{t} {tags.get(t, 'O')}\n" for t in tokens).replace("B O\nB O\nC O", "B B-ORG\nB I-ORG\nC I-ORG")
    (unit,) = build_units(read_conll(write(tmp_path, content)))
    assert unit.text == "我们使用Windows XP系统，由BBC在2024年报道"
    assert spans(unit) == [("Windows XP", "MISC"), ("BBC", "ORG")]


def test_a_spaced_language_file_quoting_chinese_keeps_its_spaces(tmp_path):
    content = "The O\nBattle B-MISC\nof I-MISC\nHulao I-MISC\n( O\n虎牢之戰 B-MISC\n) O\nwas O\nfought O\n"
    (unit,) = build_units(read_conll(write(tmp_path, content)))
    assert unit.text == "The Battle of Hulao ( 虎牢之戰 ) was fought"


def test_each_file_is_joined_by_its_own_kind(tmp_path):
    english = write(tmp_path, "Ada B-PER\nsmiled O\n", "en.conll")
    chinese = write(tmp_path, "2 O\n0 O\n张 B-PER\n伟 I-PER\n", "zh.conll")
    assert [u.text for u in build_units(read_files([english, chinese]))] == ["Ada smiled", "20张伟"]
