"""Interactive pre-annotation: drawn marks are kept, propagated without the LLM, and never contradicted."""

from backend.alignment import Span
from backend.interactive import merge_llm, propagate, read_marks
from backend.labelconfig import parse_label_config
from tests.conftest import NER_CONFIG

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


def test_marks_whose_offsets_do_not_match_the_text_are_ignored():
    marks = marks_of(region(1, 4, "PER", text="Ada"), region(0, 999, "PER", text="x"), region(8, 15, "NOPE"))
    assert marks.spans == {} and marks.ignored == 3


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
