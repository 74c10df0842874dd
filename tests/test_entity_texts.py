"""Entity texts that must be in the task (issue 27, items 1 and 3).

Where the endpoint constrains decoding to a schema, each entity's `text` is an enum of the task
text's n-grams, so a model cannot write `"<exact text>"` or a whole sentence; and an answer none of
whose entities can be placed gets one repair turn naming them, then fails the task (asked again
later) rather than being stored as "no entities".
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path

import jsonschema
import pytest

from backend.llm.source import TEXT_LIMITS
from backend.ner.constraints import MAX_TOKENS, MIN_TOKENS, TextLimits, candidates, constrained_schema
from backend.ner.labelconfig import parse_label_config
from backend.ner.task import NerTask
from backend.ner.templates import load_templates
from tests.conftest import NER_CONFIG, REPO, predict, region_tuples_per_task, run_cli
from tests.fake_llm import Reply, entities_reply

SENTENCE = "Angela Merkel met the U.S. envoy of Acme Inc. in Paris, then flew home."
# what SmolLM2-135M answered: the prompt's placeholders, and the prompt's own words
PLACEHOLDER = {"entities": [{"text": "<exact text>", "label": "<label>"}, {"text": "Marie Curie", "label": "PER"}]}


@pytest.fixture
def make_client(make_client):
    return functools.partial(make_client, setup_project="7")


def task(hints: bool = False) -> NerTask:
    return NerTask(parse_label_config(NER_CONFIG).targets[0], load_templates(REPO / "prompts", hints))


def text_schema(request: dict) -> dict:
    fmt = request["response_format"]
    schema = fmt["json_schema"]["schema"] if fmt["type"] == "json_schema" else fmt["schema"]
    return schema["properties"]["entities"]["items"]["properties"]["text"]


def test_entity_texts_can_only_be_spans_of_the_task_text():
    chosen = task().schema_for(SENTENCE, TEXT_LIMITS["json_schema"])
    assert chosen.constrained and chosen.tokens == MAX_TOKENS
    enum = chosen.schema["schema"]["properties"]["entities"]["items"]["properties"]["text"]["enum"]
    assert all(value in SENTENCE for value in enum) and len(enum) == len(set(enum)) == chosen.candidates
    # names of one to several words, an abbreviation with its full stops; no candidate starts or ends
    # with punctuation other than an abbreviation's full stop
    assert {"Angela Merkel", "U.S.", "Acme Inc.", "Paris"} <= set(enum)
    assert not [v for v in enum if not v[0].isalnum() or v.endswith((",", " "))]
    right = {"entities": [{"text": "Angela Merkel", "label": "PER"}, {"text": "Paris", "label": "LOC"}]}
    jsonschema.validate(right, chosen.schema["schema"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(PLACEHOLDER, chosen.schema["schema"])
    # the task's plain schema is left as it was (it is shared by every call)
    assert task().json_schema()["schema"]["properties"]["entities"]["items"]["properties"]["text"] == {"type": "string"}


def test_chinese_texts_are_cut_by_character_and_occurrence_hints_stay():
    text = "新华社北京电，联合国教科文组织总干事访问了星海科技（上海）有限公司。"
    chosen = task(hints=True).schema_for(text, TEXT_LIMITS["json_object_schema"])
    properties = chosen.schema["schema"]["properties"]["entities"]["items"]["properties"]
    assert {"新华社", "北京", "联合国教科文组织", "星海科技（上海）有限公司"} <= set(properties["text"]["enum"])
    assert "，" not in "".join(properties["text"]["enum"]) and properties["context"] == {"type": ["string", "null"]}


def test_beyond_the_limits_n_grams_shorten_then_the_plain_schema_is_used():
    plain = task().json_schema()
    words = " ".join(f"Word{i}" for i in range(60))
    # room for n-grams of 4 words, not of 6
    limits = TextLimits(max_values=4 + 4 * 60, max_chars=100_000)
    chosen = constrained_schema(plain, words, limits)
    assert chosen.constrained and chosen.tokens == 4 and chosen.candidates == len(candidates(words, 4))
    # not even n-grams of MIN_TOKENS fit: today's schema, and why
    chosen = constrained_schema(plain, words, TextLimits(max_values=100, max_chars=100_000))
    assert not chosen.constrained and chosen.schema is plain and chosen.candidates > 100 and chosen.tokens == MIN_TOKENS
    chosen = constrained_schema(plain, words, TextLimits(max_values=10_000, max_chars=200))  # by characters
    assert not chosen.constrained and chosen.schema is plain
    assert constrained_schema(plain, words, None).schema is plain  # an endpoint that constrains nothing


def test_predict_sends_the_constrained_schema_and_the_log_says_so(make_client, llm, caplog):
    llm.gazetteer = {"Angela Merkel": "PER", "Paris": "LOC"}
    caplog.set_level(logging.INFO, logger="backend")
    result = predict(make_client(), [SENTENCE])
    assert region_tuples_per_task(result, "text", "label") == [[("Angela Merkel", "PER"), ("Paris", "LOC")]]
    assert text_schema(llm.requests[0]) == {"type": "string", "enum": candidates(SENTENCE, MAX_TOKENS, names=True)}
    assert "entity texts constrained to spans of the text (json_schema" in caplog.text


def test_llama_cpp_pythons_form_gets_the_enum_too(make_client, llm):
    llm.behave_like_llama_cpp_python()
    llm.gazetteer = {"Paris": "LOC"}
    predict(make_client(), [SENTENCE])
    final = llm.requests[-1]
    assert final["response_format"]["type"] == "json_object"
    assert text_schema(final)["enum"] == candidates(SENTENCE, MAX_TOKENS, names=True)


def test_names_leave_out_spans_that_begin_or_end_with_a_lowercase_word_unless_the_text_has_no_capital():
    """Every n-gram lets a model pick "the U.S." or "Merkel met" as a name; a name begins and ends
    with a word that holds a capital or a digit (inside, "of", "de" and the like may stand)."""
    names = candidates(SENTENCE, MAX_TOKENS, names=True)
    assert {"Angela Merkel", "U.S.", "Acme Inc.", "Paris", "Acme Inc. in Paris"} <= set(names)
    assert not {"the U.S.", "Merkel met", "envoy", "flew home"} & set(names)
    assert set(names) < set(candidates(SENTENCE, MAX_TOKENS))
    # ENTITY_TEXT_CANDIDATES=all (labels of lowercase concepts), or a text without a capital: every n-gram
    for text, names_wanted in ((SENTENCE, False), ("aspirin eased the migraine", True), ("新华社北京电", True)):
        chosen = task().schema_for(text, TEXT_LIMITS["json_schema"], names=names_wanted)
        assert chosen.schema["schema"]["properties"]["entities"]["items"]["properties"]["text"]["enum"] == candidates(text, MAX_TOKENS)


def test_names_leave_out_words_capitalised_only_because_they_begin_a_sentence(make_client, llm):
    """Without examples SmolLM2 labelled the first capitalised span of the text, "The" or "He", as a
    PER: a function word at a sentence's start is no name's first or last word; a name there is."""
    text = "The band played in Texas. He met Abe Lyman in 1964 . In Paris, The Hague and Carter's home?\nThey left."
    names = candidates(text, MAX_TOKENS, names=True)
    assert {"Texas", "Abe Lyman", "1964", "Paris", "The Hague", "Carter"} <= set(names)
    assert not {"The band", "He", "He met Abe", "In", "In Paris", "They", "They left"} & set(names)
    # a sentence's full stop ends a name, spaced or not; an abbreviation's does not
    assert not [n for n in names if "Texas. He" in n or "1964 . In" in n]
    assert {"U.S.", "Acme Inc. in Paris"} <= set(candidates(SENTENCE, MAX_TOKENS, names=True))
    # every n-gram (ENTITY_TEXT_CANDIDATES=all) keeps them
    assert {"The", "He", "They"} <= set(candidates(text, MAX_TOKENS))
    # a text whose only capital begins it can name nothing: its schema allows no entity, where the
    # plain one let SmolLM2 write the sentence as a PER (a failed task)
    chosen = task().schema_for("Each councillor represents two city wards.", TEXT_LIMITS["json_schema"])
    assert chosen.constrained and chosen.candidates == 0
    jsonschema.validate({"entities": []}, chosen.schema["schema"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"entities": [{"text": "Each councillor", "label": "PER"}]}, chosen.schema["schema"])
    # and no call is made for it: the answer is known
    llm.gazetteer = {"Paris": "LOC"}
    regions = region_tuples_per_task(predict(make_client(), ["Each councillor represents two city wards.", "He left Paris."]), "text", "label")
    assert regions == [[], [("Paris", "LOC")]]
    assert len(llm.requests) == 1 and "Paris" in json.dumps(llm.requests[0]["messages"][-1])
    # nor is it packed with others (PACK_SIZE > 1): the pack would pay for an answer never used
    llm.requests.clear()
    llm.gazetteer["Oslo"] = "LOC"
    texts = ["Each councillor represents two city wards.", "He left Paris.", "Oslo is cold."]
    regions = region_tuples_per_task(predict(make_client(pack_size=3), texts), "text", "label")
    assert regions == [[], [("Paris", "LOC")], [("Oslo", "LOC")]]
    assert llm.requests and "councillor" not in json.dumps([r["messages"] for r in llm.requests])


def test_entity_text_candidates_all_sends_every_n_gram(make_client, llm):
    llm.gazetteer = {"Paris": "LOC"}
    predict(make_client(entity_text_candidates="all"), [SENTENCE])
    assert text_schema(llm.requests[-1])["enum"] == candidates(SENTENCE, MAX_TOKENS)


def test_a_text_with_too_many_n_grams_is_asked_with_the_plain_schema_and_the_log_names_it(make_client, llm, caplog):
    text = " ".join(f"Word{i}" for i in range(400)) + " Paris."
    llm.gazetteer = {"Paris": "LOC"}
    caplog.set_level(logging.INFO, logger="backend")
    assert region_tuples_per_task(predict(make_client(), [text]), "text") == [["Paris"]]
    assert text_schema(llm.requests[0]) == {"type": "string"}
    assert re.search(r"entity texts not constrained for a text of \d+ characters: \d+ candidates of 3 tokens", caplog.text)


def test_constrain_entity_texts_off_and_text_mode_send_the_plain_schema(make_client, llm, caplog):
    caplog.set_level(logging.INFO, logger="backend")
    predict(make_client(constrain_entity_texts=False), [SENTENCE])
    assert text_schema(llm.requests[0]) == {"type": "string"}
    assert "entity texts not constrained (CONSTRAIN_ENTITY_TEXTS is off)" in caplog.text
    predict(make_client(llm_structured_output="json_object"), [SENTENCE + " "])
    assert llm.requests[-1]["response_format"] == {"type": "json_object"}
    assert "entity texts not constrained (structured output json_object takes no schema)" in caplog.text


def test_doctor_says_whether_entity_texts_are_constrained(llm):
    done = run_cli(llm, "doctor")
    assert done.returncode == 0, done.stderr
    assert re.search(r"entity texts\s+constrained to spans of the task text \(json_schema", done.stdout), done.stdout
    llm.reject_response_format = True
    done = run_cli(llm, "doctor")
    assert re.search(r"entity texts\s+free: structured output text takes no schema", done.stdout), done.stdout


# ---- item 3: "no entities" only when the model said none ----
def test_an_answer_of_texts_not_in_the_task_gets_one_repair_turn_naming_them(make_client, llm, caplog):
    caplog.set_level(logging.INFO, logger="backend")
    llm.replies.extend([Reply(content=json.dumps(PLACEHOLDER)), entities_reply([("Angela Merkel", "PER")])])
    result = predict(make_client(constrain_entity_texts=False), [SENTENCE])
    assert region_tuples_per_task(result, "text", "label") == [[("Angela Merkel", "PER")]]
    repair = llm.requests[1]["messages"]
    assert repair[-2] == {"role": "assistant", "content": json.dumps(PLACEHOLDER)}
    assert '"<exact text>"' in repair[-1]["content"] and "do not occur in the text" in repair[-1]["content"]
    assert '"<label>"' in repair[-1]["content"]  # a label that is not one of the project's


def test_a_task_none_of_whose_entities_can_be_placed_is_failed_never_stored_empty(make_client, llm, caplog):
    caplog.set_level(logging.INFO, logger="backend")
    llm.replies.extend([Reply(content=json.dumps(PLACEHOLDER)), Reply(content=json.dumps(PLACEHOLDER))])
    result = predict(make_client(constrain_entity_texts=False), [SENTENCE], first_id=41)
    assert result["results"] == [[]]  # no prediction: Label Studio asks again later
    assert re.search(r"task 41: no pre-labels \(asked again later\): none of the entities you listed", caplog.text)
    # asked again, a model that answers gets its labels (nothing was cached)
    llm.gazetteer = {"Paris": "LOC"}
    assert region_tuples_per_task(predict(make_client(constrain_entity_texts=False), [SENTENCE]), "text") == [["Paris"]]


def test_no_entities_is_stored_when_the_model_said_none(make_client, llm):
    result = predict(make_client(), ["It rained all day in Oslo."])  # the fake knows no name in it
    assert result["results"][0]["result"] == [] and len(llm.requests) == 1


def test_dropped_entities_are_logged_with_their_task(make_client, llm, caplog):
    caplog.set_level(logging.INFO, logger="backend")
    llm.replies.append(entities_reply([("Paris", "LOC"), ("Berlin", "LOC")]))
    predict(make_client(constrain_entity_texts=False), [SENTENCE], first_id=17)
    assert "task 17: dropped entities: {'not_found': 1}" in caplog.text


def test_a_packed_text_whose_entities_cannot_be_placed_is_asked_alone(make_client, llm):
    texts = ["Oslo is cold.", "Rome is warm."]
    packed = {"results": [{"id": "1", "entities": [{"text": "Oslo", "label": "LOC"}]},
                          {"id": "2", "entities": [{"text": "<exact text>", "label": "LOC"}]}]}
    llm.replies.append(Reply(content=json.dumps(packed)))
    llm.gazetteer = {"Rome": "LOC"}
    result = predict(make_client(pack_size=2), texts)
    assert region_tuples_per_task(result, "text") == [["Oslo"], ["Rome"]]
    assert len(llm.requests) == 2 and "Rome is warm." in llm.requests[1]["messages"][-1]["content"]


def test_the_schema_module_is_the_ner_tasks_and_the_client_knows_nothing_of_ner():
    source = (REPO / "backend" / "llm" / "client.py").read_text(encoding="utf-8")
    assert "backend.ner" not in source and "constraints" not in source
    assert Path(REPO / "backend" / "ner" / "constraints.py").exists()


def test_llama_cpp_python_gets_a_smaller_enum_than_json_schema_endpoints():
    """llama-cpp-python turns the enum into a grammar that slows every sampled token: a paragraph of
    120 words is constrained on a json_schema endpoint, asked with the plain schema there."""
    words = " ".join(f"Word{i}" for i in range(120))
    assert task().schema_for(words, TEXT_LIMITS["json_schema"]).constrained
    assert not task().schema_for(words, TEXT_LIMITS["json_object_schema"]).constrained
    assert task().schema_for(SENTENCE, TEXT_LIMITS["json_object_schema"]).constrained
