"""The prompts as sent, compared character for character with files under tests/golden/.

A change to a template or to how prompts are built shows here as a diff to review. After an
intended change, regenerate the files and read the diff before committing:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_prompts_golden.py
"""

from __future__ import annotations

import json

import pytest

from backend.infra.settings import load_settings
from backend.learning.selection import FewShotExample
from backend.ner.labelconfig import parse_label_config
from backend.ner.task import NerTask
from backend.ner.templates import load_templates
from backend.spans.alignment import Span
from tests.conftest import NER_CONFIG

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


def settings(**values):
    return load_settings(openai_api_key="unused", _env_file=None, **values)


def zh_task(**values) -> NerTask:
    config = settings(prompt_language="zh", **values)
    templates = load_templates(config.prompts_dir, config.occurrence_hints)
    return NerTask(parse_label_config(ZH_CONFIG).targets[0], templates, guidelines=ZH_GUIDELINES)


@pytest.fixture
def golden(request, pytestconfig):
    """golden("name.txt", text): compare with tests/golden/name.txt, or write it with UPDATE_GOLDEN=1."""
    import os

    directory = pytestconfig.rootpath / "tests" / "golden"

    def check(name: str, actual: str) -> None:
        path = directory / name
        if os.environ.get("UPDATE_GOLDEN") == "1":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(actual, encoding="utf-8")
        assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1 to write it"
        assert actual == path.read_text(encoding="utf-8"), f"{name} differs from the golden file"

    return check


def as_text(messages: list[dict[str, str]]) -> str:
    """Messages as a file a reviewer can read: each turn under its role."""
    return "".join(f"===== {m['role']} =====\n{m['content']}\n" for m in messages)


def test_chinese_prompt_with_hints_examples_negatives_and_guidelines(golden):
    task = zh_task()
    assert task.templates.hints  # PROMPT_LANGUAGE=zh asks for occurrence hints unless told not to
    golden("zh/messages.txt", as_text(task.messages(ZH_TEXT, ZH_EXAMPLES)))
    golden("zh/schema.json", json.dumps(task.json_schema(), ensure_ascii=False, indent=2) + "\n")
    golden("zh/repair.txt", task.repair_prompt('entities.0.label: Input should be "人名", "地名" or "机构"') + "\n")
    marks = [Span(8, 9, "中", "地名"), Span(18, 21, "联合国", "机构")]
    golden("zh/marks.txt", task.templates.render("marks", marks=marks) + "\n")


def test_chinese_packed_prompt(golden):
    from backend.ner.packing import pack_messages, pack_repair_prompt

    task = zh_task()
    golden("zh/packed.txt", as_text(pack_messages(task, [ZH_TEXT, "马上要开会了，马主任说。"], ZH_EXAMPLES)))
    golden("zh/pack_repair.txt", pack_repair_prompt(task, "results: Field required") + "\n")


def test_chinese_prompt_without_hints(golden):
    task = zh_task(occurrence_hints=False)
    golden("zh/messages-no-hints.txt", as_text(task.messages(ZH_TEXT, ZH_EXAMPLES)))
    assert "context" not in json.dumps(task.json_schema())


def test_the_english_prompt_is_unchanged(golden):
    config = settings()
    assert not config.occurrence_hints and config.prompts_dir.name == "prompts"
    task = NerTask(parse_label_config(NER_CONFIG).targets[0], load_templates(config.prompts_dir), guidelines="Label ships as MISC.")
    example = FewShotExample("Tim Cook runs Apple.", (("Tim Cook", "PER"), ("Apple", "ORG")), rejected=(("The Board", "ORG"),))
    golden("en/messages.txt", as_text(task.messages("Satya Nadella runs Microsoft.", [example])))
    golden("en/schema.json", json.dumps(task.json_schema(), ensure_ascii=False, indent=2) + "\n")
