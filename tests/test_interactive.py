"""Interactive pre-annotation: drawn marks are kept, propagated without the LLM, and never contradicted."""

import time

from backend.ner.labelconfig import parse_label_config
from backend.pipeline.interactive import merge_llm, propagate, read_marks
from backend.spans.alignment import Span
from tests.conftest import NER_CONFIG, predict, region_tuples
from tests.fake_llm import entities_reply

CONFIG_WITH_GUIDELINES = NER_CONFIG.replace(
    "</View>", '<TextArea name="instructions" toName="text"/></View>'
)
TEXT = "Ada met Babbage. Later Ada wrote notes; Babbage read Ada's notes."


def region(start, end, label, text=None, from_name="label"):
    value = {"start": start, "end": end, "labels": [label]}
    value["text"] = TEXT[start:end] if text is None else text
    return {"from_name": from_name, "to_name": "text", "type": "labels", "value": value}


def marks_of(*regions, config=NER_CONFIG, text=TEXT):
    return read_marks({"result": list(regions)}, parse_label_config(config), {"text": text}, "instructions")


def test_every_other_mention_of_a_marked_surface_gets_its_label():
    marks = marks_of(region(0, 3, "PER"))
    drawn = marks.spans["label"]
    assert drawn == [Span(0, 3, "Ada", "PER")]
    assert [(s.start, s.text, s.label) for s in propagate(TEXT, drawn)] == [(23, "Ada", "PER"), (53, "Ada", "PER")]


def test_a_surface_marked_with_two_labels_is_not_propagated():
    drawn = marks_of(region(0, 3, "PER"), region(23, 26, "ORG")).spans["label"]
    assert propagate(TEXT, drawn) == []


def test_marks_whose_offsets_do_not_match_the_text_are_ignored_and_logged(caplog):
    caplog.set_level("INFO", logger="backend.pipeline.interactive")
    marks = marks_of(region(1, 4, "PER", text="Ada"), region(0, 999, "PER", text="x"), region(8, 15, "NOPE"))
    assert marks.spans == {} and marks.ignored == 3
    assert sum("interactive mark ignored" in r.getMessage() for r in caplog.records) == 3


def test_an_empty_or_missing_context_has_no_marks():
    schema = parse_label_config(NER_CONFIG)
    assert not read_marks(None, schema, {"text": TEXT}, "instructions")
    assert not read_marks({}, schema, {"text": TEXT}, "instructions")
    assert not read_marks({"result": []}, schema, {"text": TEXT}, "instructions")
    assert not read_marks({"result": "junk"}, schema, {"text": TEXT}, "instructions")


def test_llm_spans_never_overlap_or_contradict_the_marks():
    drawn = [Span(0, 3, "Ada", "PER")]
    propagated = propagate(TEXT, drawn)
    llm = [Span(0, 3, "Ada", "ORG"), Span(8, 15, "Babbage", "PER"), Span(23, 26, "Ada", "LOC"), Span(40, 47, "Babbage", "PER")]
    kept = merge_llm(drawn, propagated, llm)
    assert kept == [Span(8, 15, "Babbage", "PER"), Span(40, 47, "Babbage", "PER")]


def test_guidelines_come_from_the_configured_textarea_only():
    guidelines = {"from_name": "instructions", "to_name": "text", "type": "textarea", "value": {"text": ["Label {ships} as MISC"]}}
    other = {"from_name": "notes", "to_name": "text", "type": "textarea", "value": {"text": ["not guidelines"]}}
    marks = marks_of(guidelines, other, config=CONFIG_WITH_GUIDELINES)
    assert marks.guidelines == "Label {ships} as MISC"
    assert not marks_of(guidelines).guidelines  # the plain config has no such TextArea


# ---- through the /predict endpoint (Flask test client, fake LLM over HTTP) ----


def interactive_predict(client, *regions):
    """What the labeling UI asks after the annotator drew `regions` in TEXT: the pre-labels, sorted."""
    answer = predict(client, [TEXT], project="4.1", config=CONFIG_WITH_GUIDELINES, params={"context": {"result": list(regions)}})
    (entry,) = answer["results"]
    return sorted(region_tuples(entry["result"], "start", "text", "label"))


def test_marked_surface_is_propagated_and_the_llm_completes_the_rest(make_client, llm):
    llm.replies.append(entities_reply([("Ada", "PER"), ("Babbage", "PER"), ("Ada", "ORG"), ("Babbage", "PER")]))
    client = make_client()
    spans = interactive_predict(client, region(0, 3, "PER"))
    # drawn region (0) not echoed; its other mentions propagated; the LLM's "Ada"=ORG contradicts the mark: dropped
    assert spans == [(8, "Babbage", "PER"), (23, "Ada", "PER"), (40, "Babbage", "PER"), (53, "Ada", "PER")]
    system = llm.requests[0]["messages"][0]["content"]
    assert '"Ada" is PER' in system


def test_without_the_llm_only_the_fast_path_answers(make_client, llm):
    client = make_client(interactive_llm=False)
    assert interactive_predict(client, region(0, 3, "PER")) == [(23, "Ada", "PER"), (53, "Ada", "PER")]
    assert llm.requests == []


def test_a_slow_llm_does_not_hold_the_fast_path(make_client, llm):
    llm.latency = 60.0
    client = make_client(interactive_deadline=0.5)
    started = time.monotonic()
    spans = interactive_predict(client, region(0, 3, "PER"))
    assert time.monotonic() - started < 30  # at the deadline, not after the LLM's 60 s
    assert spans == [(23, "Ada", "PER"), (53, "Ada", "PER")]


def test_guidelines_typed_in_the_box_steer_this_prediction_and_braces_are_safe(make_client, llm):
    client = make_client()
    box = {"from_name": "instructions", "to_name": "text", "type": "textarea", "value": {"text": ["Tag {{ ships }} as MISC {%"]}}
    interactive_predict(client, box)
    assert "Tag {{ ships }} as MISC {%" in llm.requests[0]["messages"][0]["content"]


def test_submitted_guidelines_are_stored_and_change_the_model_version(make_client, llm):
    client = make_client()
    setup = lambda: client.post("/setup", json={"project": "4", "schema": CONFIG_WITH_GUIDELINES}).json["model_version"]
    before = setup()
    annotation = {
        "id": 11, "task": 1, "was_cancelled": False,
        "result": [
            region(0, 3, "PER"),
            {"from_name": "instructions", "to_name": "text", "type": "textarea", "value": {"text": ["Titles are not part of PER"]}},
        ],
    }
    payload = {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": {"id": 1, "data": {"text": TEXT}},
               "project": {"id": 4, "label_config": CONFIG_WITH_GUIDELINES}}
    assert client.post("/webhook", json=payload).status_code == 201
    after = setup()
    assert after != before
    predict(client, ["Grace Hopper"], project="4.2", config=None, first_id=2)
    assert "Titles are not part of PER" in llm.requests[-1]["messages"][0]["content"]
