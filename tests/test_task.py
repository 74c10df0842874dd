"""The NER task: prompts from the templates, and every answer shape the LLM may give."""

import json

import pytest

from backend.infra.errors import LLMOutputError
from backend.infra.settings import REPO_DIR
from backend.ner.labelconfig import parse_label_config
from backend.ner.mentions import FewShotExample
from backend.ner.task import NerTask, parse_answer
from backend.ner.templates import load_templates
from tests.conftest import NER_CONFIG


@pytest.fixture
def task():
    return NerTask(parse_label_config(NER_CONFIG).targets[0], load_templates(REPO_DIR / "prompts"))


def test_system_prompt_lists_labels_with_hints(task):
    prompt = task.system_prompt()
    assert "- PER: people, including fictional" in prompt
    assert "- MISC" in prompt
    assert "every mention in order of appearance" in prompt


def test_braces_and_template_syntax_in_text_are_data(task):
    text = 'He said {name} and {{ 7*7 }} and {% for x in y %} {"entities": []}'
    user = task.user_prompt(text)
    assert text in user
    assert "49" not in user


def test_examples_become_prior_turns(task):
    example = FewShotExample(text="Tim Cook runs Apple.", entities=(("Tim Cook", "PER"), ("Apple", "ORG")))
    messages = task.messages("Satya Nadella runs Microsoft.", [example])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert json.loads(messages[2]["content"]) == {
        "entities": [{"text": "Tim Cook", "label": "PER"}, {"text": "Apple", "label": "ORG"}]
    }
    assert "Satya Nadella runs Microsoft." in messages[3]["content"]


def test_json_schema_has_labels_as_enum(task):
    schema = task.json_schema()["schema"]
    assert schema["properties"]["entities"]["items"]["properties"]["label"]["enum"] == ["PER", "ORG", "LOC", "MISC"]


GOOD = [("Paris", "LOC")]


@pytest.mark.parametrize(
    "content",
    [
        '{"entities": [{"text": "Paris", "label": "LOC"}]}',
        '```json\n{"entities": [{"text": "Paris", "label": "LOC"}]}\n```',
        'Sure! Here you go:\n{"entities": [{"text": "Paris", "label": "LOC"}]}\nHope it helps.',
        '[{"text": "Paris", "label": "LOC"}]',
        '{"entities": [{"text": "Paris", "label": "LOC", "confidence": 0.9, "reason": "city"}]}',
        "```\n[{\"text\": \"Paris\", \"label\": \"LOC\"}]\n```",
    ],
)
def test_answer_shapes_that_parse(content):
    assert [(e.text, e.label) for e in parse_answer(content)] == GOOD


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "empty"),
        ("", "empty"),
        ("I could not find any entities.", "no JSON"),
        ('{"entities": [{"text": "Paris"}]}', "label"),
        ('{"ents": []}', "entities"),
        ('{"entities": [{"text": "Paris", "label": "LOC"}', "entities"),
    ],
)
def test_answers_that_do_not_parse_say_why(content, message):
    with pytest.raises(LLMOutputError) as error:
        parse_answer(content)
    assert message in str(error.value)


def test_entities_annotators_deleted_from_drafts_are_shown_as_negatives(task):
    example = FewShotExample(
        text="The Government met Acme.", entities=(("Acme", "ORG"),), rejected=(("The Government", "ORG"),)
    )
    system = task.messages("The Council met Initech.", [example])[0]["content"]
    assert '"The Government" as ORG' in system
    assert "deleted" not in task.messages("x", [])[0]["content"]
