"""The prompts as sent, compared character for character with files under tests/golden/ (en/, zh/).

A change to a template, to how labels, examples, negatives, marks or packs are put in, or to Jinja's
whitespace handling shows here as a diff to review (the English label list once ran into one line,
`- PER: people, including fictional- ORG- LOC`, unseen by tests that looked for substrings). After an
intended change, regenerate the files and read the diff before committing:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_prompts_golden.py
"""

from __future__ import annotations

import json
import re

import pytest

from backend.infra.settings import load_settings
from backend.learning.selection import FewShotExample
from backend.llm.probe import PROBE_MESSAGES
from backend.ner.labelconfig import parse_label_config
from backend.ner.packing import pack_messages, pack_repair_prompt
from backend.ner.task import NerTask
from backend.ner.templates import load_templates
from backend.pipeline.interactive import marks_prompt
from backend.spans.alignment import Span
from tests.conftest import NER_CONFIG, assert_golden, transcript

# Chinese label names and hints, as a Chinese-speaking team writes its label config
ZH_CONFIG = """<View>
  <Labels name="label" toName="text">
    <Label value="人名" background="red" hint="真实或虚构的人物，包括单字的姓氏称呼，如“李总理”中的“李”"/>
    <Label value="地名" background="green" hint="国家、地区、城市；包括“中美关系”中的“中”“美”这样的单字简称"/>
    <Label value="机构" background="blue" hint="公司、政府部门、媒体、学校"/>
  </Labels>
  <Text name="text" value="$text"/>
</View>"""

ZH_EXAMPLES = [
    FewShotExample(
        "在过去的五年中，中美关系稳步发展。",
        (("中", "地名"), ("美", "地名")),
        starts=(8, 9),
        rejected=(("五年中", "地名"),),
    ),
    FewShotExample(
        "新华社北京１２月３日电，李总理会见了联合国秘书长。",
        (("新华社", "机构"), ("北京", "地名"), ("李", "人名"), ("联合国", "机构")),
        starts=(0, 3, 12, 18),
    ),
]
ZH_TEXT = "美好的日子里，李娜在日记中写道：“中法友谊长存。”"
ZH_GUIDELINES = "媒体名称（如新华社）标为机构；书名号不算在实体内。"

EN_EXAMPLES = [
    FewShotExample("Tim Cook runs Apple from Cupertino.", (("Tim Cook", "PER"), ("Apple", "ORG"), ("Cupertino", "LOC"))),
    FewShotExample(
        "The Government met Acme in {Paris}.", (("Acme", "ORG"), ("Paris", "LOC")), rejected=(("The Government", "ORG"),)
    ),
]
EN_TEXT = 'Satya Nadella said "{{ 7*7 }}" at Microsoft.\nSecond line.'


def settings(**values):
    return load_settings(openai_api_key="unused", _env_file=None, **values)


def zh_task(**values) -> NerTask:
    config = settings(prompt_language="zh", **values)
    templates = load_templates(config.prompts_dir, config.occurrence_hints)
    return NerTask(parse_label_config(ZH_CONFIG).targets[0], templates, guidelines=ZH_GUIDELINES)


@pytest.fixture(scope="module")
def en_templates():
    config = settings()
    assert not config.occurrence_hints and config.prompts_dir.name == "prompts"
    return load_templates(config.prompts_dir)


@pytest.fixture(scope="module")
def en_task(en_templates):
    return NerTask(parse_label_config(NER_CONFIG).targets[0], en_templates)


# ---- Chinese ----
def test_chinese_prompt_with_hints_examples_negatives_and_guidelines():
    task = zh_task()
    assert task.templates.hints  # PROMPT_LANGUAGE=zh asks for occurrence hints unless told not to
    assert_golden("zh/messages.txt", transcript(task.messages(ZH_TEXT, ZH_EXAMPLES)))
    assert_golden("zh/schema.json", json.dumps(task.json_schema(), ensure_ascii=False, indent=2) + "\n")
    assert_golden("zh/repair.txt", task.repair_prompt('entities.0.label: Input should be "人名", "地名" or "机构"') + "\n")
    marks = [Span(8, 9, "中", "地名"), Span(18, 21, "联合国", "机构")]
    assert_golden("zh/marks.txt", task.templates.render("marks", marks=marks) + "\n")


def test_chinese_packed_prompt():
    task = zh_task()
    assert_golden("zh/packed.txt", transcript(pack_messages(task, [ZH_TEXT, "马上要开会了，马主任说。"], ZH_EXAMPLES)))
    assert_golden("zh/pack_repair.txt", pack_repair_prompt(task, "results: Field required") + "\n")


def test_chinese_prompt_without_hints():
    task = zh_task(occurrence_hints=False)
    assert_golden("zh/messages-no-hints.txt", transcript(task.messages(ZH_TEXT, ZH_EXAMPLES)))
    assert "context" not in json.dumps(task.json_schema())


# ---- English ----
def test_english_system_prompt(en_task):
    assert_golden("en/system.txt", en_task.system_prompt() + "\n")


def test_english_system_prompt_with_guidelines_and_negatives(en_templates):
    task = NerTask(parse_label_config(NER_CONFIG).targets[0], en_templates, guidelines="Sports teams are ORG.\nCities are LOC.")
    assert_golden("en/system-guidelines-negatives.txt", task.system_prompt(EN_EXAMPLES) + "\n")


def test_english_messages_with_an_example_negatives_and_guidelines(en_templates):
    task = NerTask(parse_label_config(NER_CONFIG).targets[0], en_templates, guidelines="Label ships as MISC.")
    example = FewShotExample("Tim Cook runs Apple.", (("Tim Cook", "PER"), ("Apple", "ORG")), rejected=(("The Board", "ORG"),))
    assert_golden("en/messages.txt", transcript(task.messages("Satya Nadella runs Microsoft.", [example])))
    assert_golden("en/schema.json", json.dumps(task.json_schema(), ensure_ascii=False, indent=2) + "\n")


def test_english_messages_of_a_text_with_braces_and_two_examples(en_task):
    assert_golden("en/user.txt", en_task.user_prompt(EN_TEXT) + "\n")
    assert_golden("en/messages-two-examples.txt", transcript(en_task.messages(EN_TEXT, EN_EXAMPLES)))


def test_english_repair_and_marks_prompts(en_task, en_templates):
    assert_golden("en/repair.txt", en_task.repair_prompt("entities.0.label: Field required") + "\n")
    marks = [Span(0, 3, "Ada", "PER"), Span(19, 25, "London", "LOC")]
    assert_golden("en/marks.txt", marks_prompt(en_templates, marks) + "\n")


def test_english_packed_prompt(en_task):
    texts = ["Oslo is cold.", "Ada wrote notes.", EN_TEXT]
    assert_golden("en/packed.txt", transcript(pack_messages(en_task, texts, EN_EXAMPLES)))
    assert_golden("en/pack_repair.txt", pack_repair_prompt(en_task, "results.0.id: Field required") + "\n")


# ---- no placeholder syntax a small model copies (issue 27: SmolLM2-135M answered "<exact text>") ----
PLACEHOLDER = re.compile(r'"<[^"<>]+>"|<(?:原文|标签|id|label|exact text)>')

CUSTOM_CONFIG = """<View>
  <Labels name="label" toName="text"><Label value="DRUG"/><Label value="DOSE"/></Labels>
  <Text name="text" value="$text"/>
</View>"""


@pytest.mark.parametrize("language", ["en", "zh"])
@pytest.mark.parametrize("hints", [False, True])
def test_no_prompt_shows_the_answer_format_with_placeholders(language, hints):
    config = settings(prompt_language=language, occurrence_hints=hints)
    templates = load_templates(config.prompts_dir, config.occurrence_hints)
    for label_config in (NER_CONFIG, ZH_CONFIG, CUSTOM_CONFIG):
        task = NerTask(parse_label_config(label_config).targets[0], templates)
        prompts = [
            transcript(task.messages(EN_TEXT)), task.repair_prompt("entities.0.text: Field required"),
            transcript(pack_messages(task, ["Oslo is cold.", "Rome."])), pack_repair_prompt(task, "results: Field required"),
        ]
        for prompt in prompts:
            assert not PLACEHOLDER.search(prompt), prompt


def test_the_probe_shows_no_placeholders_either():
    """The capability probe's request is a pre-labeling request too: its answer is what the doctor
    reports for structured output and latency."""
    assert not PLACEHOLDER.search(transcript(PROBE_MESSAGES))


@pytest.mark.parametrize("language", ["en", "zh"])
def test_the_format_is_shown_by_a_worked_example_with_the_projects_labels(language):
    config = settings(prompt_language=language)
    templates = load_templates(config.prompts_dir, config.occurrence_hints)
    for label_config in (NER_CONFIG, ZH_CONFIG):
        task = NerTask(parse_label_config(label_config).targets[0], templates)
        example = task.worked_example()
        answer = json.loads(example["answer"])["entities"]
        assert {e["label"] for e in answer} == set(task.target.label_names) - {"MISC"}
        assert all(e["text"] in example["text"] for e in answer) and example["answer"] in task.system_prompt()
    # labels the example does not know: no example rather than a wrong one
    custom = NerTask(parse_label_config(CUSTOM_CONFIG).targets[0], templates)
    assert custom.worked_example() is None and "Marie Curie" not in custom.system_prompt()
