"""fit() through POST /webhook: corrections become few-shot examples the next /predict shows the LLM."""

from __future__ import annotations

import json
import logging
import time

import pytest
from hypothesis import given
from hypothesis import settings as settings_hypothesis
from hypothesis import strategies as st

from tests.conftest import (
    NER_CONFIG,
    PROJECT_TOKEN,
    annotation_event,
    deleted_event,
    metric,
    open_store,
    predict,
    shown_examples,
    span,
)


@pytest.fixture(autouse=True)
def connected(client, database_url):
    """Label Studio calls /setup when the backend is connected; webhooks of unknown projects are ignored.
    Every test of the store runs on both engines (`database_url`: SQLite, PostgreSQL)."""
    for project in ("7", "8"):
        assert client.post("/setup", json={"project": project, "schema": NER_CONFIG}).status_code == 200


def version(client) -> str:
    response = client.post("/setup", json={"project": "7", "schema": NER_CONFIG})
    assert response.status_code == 200
    return response.json["model_version"]


def store(settings, project="7"):
    from backend.learning.store import ExampleStore

    return ExampleStore(open_store(settings), project)


TEXT_A = "Jordan signed with the Chicago Bulls in 1984."
NEW_TASK = 900  # the id of the task predicted: no example belongs to it


def test_a_correction_is_shown_to_the_llm_as_a_prior_exchange_for_the_next_task(client, llm):
    # the LLM got "Chicago Bulls" wrong; the annotator corrected it to ORG and added Jordan
    result = [span(TEXT_A, "Jordan", "PER"), span(TEXT_A, "Chicago Bulls", "ORG")]
    response = client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, TEXT_A, result))
    assert response.status_code == 201, response.json
    predict(client, ["Pippen joined the Chicago Bulls in 1987."], project="7.17", first_id=NEW_TASK)
    assert shown_examples(llm.requests[-1]) == [(TEXT_A, [("Jordan", "PER"), ("Chicago Bulls", "ORG")])]


def test_model_version_changes_whenever_the_example_set_changes_and_only_then(client):
    v0 = version(client)
    event = annotation_event("ANNOTATION_CREATED", 11, 1, TEXT_A, [span(TEXT_A, "Jordan", "PER")])
    client.post("/webhook", json=event)
    v1 = version(client)
    client.post("/webhook", json=event)  # the same annotation again: nothing changed
    assert version(client) == v1
    updated = annotation_event("ANNOTATION_UPDATED", 11, 1, TEXT_A, [span(TEXT_A, "Chicago Bulls", "ORG")], updated_at="2025-01-01T11:00:00Z")
    client.post("/webhook", json=updated)
    v2 = version(client)
    client.post("/webhook", json=deleted_event(11))
    v3 = version(client)
    assert len({v0, v1, v2}) == 3
    assert v3 == v0  # back to no examples: the fingerprint is the content, not a counter


def test_predictions_carry_the_version_setup_answers_after_a_correction(client):
    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, TEXT_A, [span(TEXT_A, "Jordan", "PER")]))
    assert predict(client, ["Another text."], project="7.17", first_id=NEW_TASK)["results"][0]["model_version"] == version(client)


def test_an_update_replaces_the_example_of_that_task(client, llm):
    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, TEXT_A, [span(TEXT_A, "Jordan", "PER")]))
    client.post("/webhook", json=annotation_event("ANNOTATION_UPDATED", 11, 1, TEXT_A, [span(TEXT_A, "Chicago Bulls", "ORG")], updated_at="2025-01-02T00:00:00Z"))
    predict(client, ["The Chicago Bulls won."], project="7.17", first_id=NEW_TASK)
    assert shown_examples(llm.requests[-1]) == [(TEXT_A, [("Chicago Bulls", "ORG")])]


def test_a_second_annotators_newer_annotation_is_the_tasks_example_and_the_older_returns_when_it_is_deleted(client, llm, settings):
    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, TEXT_A, [span(TEXT_A, "Jordan", "PER")]))
    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 12, 1, TEXT_A, [span(TEXT_A, "Jordan", "ORG")], updated_at="2025-01-03T00:00:00Z"))
    assert [(e.annotation_id, e.task_id) for e in store(settings).examples()] == [(12, 1)]
    assert store(settings).count() == 1  # two annotations, one task: one example
    client.post("/webhook", json=deleted_event(12))
    assert [(e.annotation_id, e.task_id) for e in store(settings).examples()] == [(11, 1)]


def test_an_update_arriving_after_a_newer_one_does_not_overwrite_it(client, settings):
    newer = annotation_event("ANNOTATION_UPDATED", 11, 1, TEXT_A, [span(TEXT_A, "Chicago Bulls", "ORG")], updated_at="2025-01-02T00:00:00Z")
    older = annotation_event("ANNOTATION_CREATED", 11, 1, TEXT_A, [span(TEXT_A, "Jordan", "PER")], updated_at="2025-01-01T00:00:00Z")
    client.post("/webhook", json=newer)
    response = client.post("/webhook", json=older)
    assert response.status_code == 201
    (example,) = store(settings).examples()
    assert [(s.text, s.label) for s in example.spans] == [("Chicago Bulls", "ORG")]


def test_deleted_annotations_are_removed_and_a_late_update_cannot_bring_them_back(client, llm, settings):
    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, TEXT_A, [span(TEXT_A, "Jordan", "PER")]))
    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 21, 2, "Paris is big.", [span("Paris is big.", "Paris", "LOC")]))
    response = client.post("/webhook", json=deleted_event(11, 999))
    assert response.status_code == 201
    assert [e.annotation_id for e in store(settings).examples()] == [21]
    client.post("/webhook", json=annotation_event("ANNOTATION_UPDATED", 11, 1, TEXT_A, [span(TEXT_A, "Jordan", "PER")], updated_at="2026-01-01T00:00:00Z"))
    assert [e.annotation_id for e in store(settings).examples()] == [21]
    predict(client, ["Jordan in Paris."], project="7.17", first_id=NEW_TASK)
    assert [text for text, _ in shown_examples(llm.requests[-1])] == ["Paris is big."]


def test_skipped_annotations_are_not_examples_and_skipping_later_removes_one(client, settings):
    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 31, 3, TEXT_A, [], was_cancelled=True))
    assert store(settings).examples() == []
    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, TEXT_A, [span(TEXT_A, "Jordan", "PER")]))
    client.post("/webhook", json=annotation_event("ANNOTATION_UPDATED", 11, 1, TEXT_A, [], updated_at="2025-02-01T00:00:00Z", was_cancelled=True))
    assert store(settings).examples() == []


def test_an_annotation_with_no_entities_is_an_example_of_a_text_without_entities(client, llm):
    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, "Nothing to label here today.", []))
    predict(client, ["Nothing much here today."], project="7.17", first_id=NEW_TASK)
    assert shown_examples(llm.requests[-1]) == [("Nothing to label here today.", [])]


def test_human_spans_are_checked_against_the_text_repaired_or_dropped_and_counted(client, settings):
    text = "😀 Ada Lovelace\r\nmet Charles  Babbage in London."
    result = [
        span(text, "Ada Lovelace", "PER", start=3, end=15),  # UTF-16 offsets: the emoji counted as two
        span(text, "Charles Babbage", "PER", start=19, end=34),  # spaces collapsed, CRLF counted as one
        span(text, "London", "LOC", start=10, end=16),  # wrong offsets, right text
        span(text, "Berlin", "LOC", start=40, end=46),  # not in the text at all
        span(text, "London", "LOC", start=44, end=500),  # out of range: re-located, the same span again
        {"from_name": "label", "to_name": "text", "type": "labels", "value": {"start": 400, "end": 410, "labels": ["LOC"]}},
        span(text, "Ada", "CITY"),  # a label the config does not have
        {"from_name": "comment", "to_name": "text", "type": "textarea", "value": {"text": ["fine"]}},  # another control
    ]
    outcomes = ("repaired", "dropped_not_in_text", "dropped_bad_offsets", "dropped_unknown_label", "dropped_duplicate")
    before = {o: metric("llm_ner_example_spans_total", outcome=o) for o in outcomes}
    response = client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, text, result))
    assert response.status_code == 201
    (example,) = store(settings).examples()
    assert [(s.start, s.text, s.label) for s in example.spans] == [
        (2, "Ada Lovelace", "PER"), (20, "Charles  Babbage", "PER"), (40, "London", "LOC")]
    assert all(text[s.start:s.end] == s.text for s in example.spans)
    counted = {o: metric("llm_ner_example_spans_total", outcome=o) - before[o] for o in outcomes}
    # three repaired and kept, a fourth repaired and then dropped as the same span again
    assert counted == {"repaired": 4, "dropped_not_in_text": 1, "dropped_bad_offsets": 1, "dropped_unknown_label": 1,
                       "dropped_duplicate": 1}


def _without(event: dict, *path: str) -> dict:
    event = json.loads(json.dumps(event))
    target = event
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return event


GOOD = annotation_event("ANNOTATION_CREATED", 11, 1, TEXT_A, [span(TEXT_A, "Jordan", "PER")])


@pytest.mark.parametrize(
    "body, needle",
    [
        (_without(GOOD, "annotation"), "annotation"),
        (_without(GOOD, "task"), "task"),
        (_without(GOOD, "task", "data"), "task.data"),
        (_without(GOOD, "annotation", "id"), "annotation.id"),
        ({**GOOD, "task": {"id": 1, "data": {"body": TEXT_A}}}, "'text'"),
        ({**GOOD, "task": {"id": 1, "data": {"text": 42}}}, "'text'"),
        ({**GOOD, "annotation": {**GOOD["annotation"], "id": "eleven"}}, "annotation.id"),
        ({**GOOD, "annotation": {**GOOD["annotation"], "result": "PER"}}, "annotation.result"),
        ({**GOOD, "annotation": {**GOOD["annotation"], "task": 2}}, "task.id"),
        ({**deleted_event(1), "annotations": None}, "annotations"),
        ({**deleted_event(1), "annotations": [{"id": "x"}]}, "annotations[0]"),
        ({**deleted_event(1), "annotations": [5]}, "annotations[0]"),
        ({"project": {"id": 7}}, "action"),
    ],
)
def test_bad_payloads_get_a_4xx_naming_the_problem_never_a_500(client, settings, body, needle):
    response = client.post("/webhook", json=body)
    assert 400 <= response.status_code < 500, response.json
    assert needle in response.json["error"]
    assert store(settings).examples() == []


def test_a_body_that_is_not_json_gets_a_400(client):
    response = client.post("/webhook", data="{nope", content_type="application/json")
    assert response.status_code == 400 and "JSON" in response.json["error"]


@pytest.mark.parametrize("action", ["PROJECT_UPDATED", "TASKS_DELETED", "SOMETHING_NEW"])
def test_unknown_and_unused_events_are_acknowledged(client, action):
    response = client.post("/webhook", json={"action": action, "project": {"id": 7, "label_config": NER_CONFIG}})
    assert response.status_code == 201


def test_start_training_without_label_studio_settings_is_a_clear_4xx(client):
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7, "label_config": NER_CONFIG, "token": PROJECT_TOKEN}})
    assert response.status_code == 403  # the trust table: not offered in open mode
    assert "LABEL_STUDIO_URL" in response.json["error"] and "LABEL_STUDIO_API_KEY" in response.json["error"]


def test_the_payloads_project_token_never_reaches_the_logs(client, caplog):
    caplog.set_level(logging.DEBUG)
    client.post("/webhook", json=GOOD)
    client.post("/webhook", json=_without(GOOD, "task"))
    client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7, "label_config": NER_CONFIG, "token": PROJECT_TOKEN}})
    assert caplog.records and PROJECT_TOKEN not in caplog.text


def test_examples_of_another_project_are_never_shown(client, llm):
    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, TEXT_A, [span(TEXT_A, "Jordan", "PER")], project=8))
    predict(client, ["Jordan again."], project="7.17", first_id=NEW_TASK)
    assert shown_examples(llm.requests[-1]) == []


def test_the_task_being_predicted_is_not_its_own_example(client, llm):
    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, TEXT_A, [span(TEXT_A, "Jordan", "PER")]))
    predict(client, [TEXT_A], project="7.17", first_id=1)
    assert shown_examples(llm.requests[-1]) == []


def test_a_rebuild_keeps_what_webhooks_changed_while_it_was_reading_label_studio(client, settings):
    from backend.spans.alignment import Span

    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, TEXT_A, [span(TEXT_A, "Jordan", "PER")]))
    started_at = time.time()  # the rebuild reads Label Studio from here on...
    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 21, 2, "Paris is big.", [span("Paris is big.", "Paris", "LOC")]))
    store(settings).delete_annotations([31])  # a deletion Label Studio confirmed (or a trusted caller sent)
    # ...and got: annotation 11 with another answer, 31 (deleted meanwhile), not 21 (created meanwhile)
    label_studio_view = [
        (11, 1, 1.0, {"label": (TEXT_A, [Span(23, 36, "Chicago Bulls", "ORG")])}),
        (31, 3, 1.0, {"label": ("Rome too.", [Span(0, 4, "Rome", "LOC")])}),
    ]
    assert store(settings).replace_all(label_studio_view, started_at) == 2
    examples = {e.annotation_id: [(s.text, s.label) for s in e.spans] for e in store(settings).examples()}
    assert examples == {11: [("Chicago Bulls", "ORG")], 21: [("Paris", "LOC")]}


def test_labels_the_label_config_no_longer_has_are_not_shown(client, llm):
    text = "The euro rose in Paris."
    client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, text, [span(text, "euro", "MISC"), span(text, "Paris", "LOC")]))
    without_misc = NER_CONFIG.replace('    <Label value="MISC" background="orange"/>\n', "")
    assert without_misc != NER_CONFIG
    response = client.post("/predict", json={"tasks": [{"id": 5, "data": {"text": "The euro fell in Rome."}}], "project": "7.2", "label_config": without_misc})
    assert response.status_code == 200
    assert shown_examples(llm.requests[-1]) == [(text, [("Paris", "LOC")])]


ALPHABET = "ab AB😀é\r\n\t.,-"


@settings_hypothesis(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, min_size=0, max_size=40),
    raw=st.lists(st.tuples(st.integers(-3, 60), st.integers(-3, 60), st.text(alphabet=ALPHABET, max_size=8) | st.none()), max_size=6),
)
def test_every_kept_human_span_matches_the_text_whatever_the_offsets(text, raw):
    from backend.learning.webhooks import check_spans
    from backend.ner.labelconfig import parse_label_config

    (target,) = parse_label_config(NER_CONFIG).targets
    results = [{"from_name": "label", "type": "labels", "value": {"start": a, "end": b, "labels": ["PER"], **({} if t is None else {"text": t})}}
               for a, b, t in raw]
    checked = check_spans(text, results, target)
    for s in checked.spans:
        assert 0 <= s.start < s.end <= len(text) and text[s.start:s.end] == s.text and s.text.strip()
    assert len(checked.spans) + sum(n for k, n in checked.counts.items() if k.startswith("dropped")) == len(raw)


def test_start_training_answers_at_once_and_rebuilds_after_the_answer(tmp_path, llm, caplog):
    """Against a Label Studio that does not answer until the webhook has (and then fails): the webhook does
    not wait. An order of events, not a clock: a webhook that waited would get its answer only when the
    60 s fallback releases Label Studio, after it answered."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from backend.infra.settings import load_settings
    from backend.protocol.server import create_app
    from tests.processes import TEST_API_KEY, wait_until

    seen = []
    release, answered = threading.Event(), []
    fallback = threading.Timer(60, release.set)

    class SlowLabelStudio(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            release.wait()
            answered.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowLabelStudio)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ls_key = "ls-key-0123456789abcdef"
    base = dict(openai_api_key=TEST_API_KEY, openai_base_url=llm.base_url, model_dir=tmp_path / "m", _env_file=None)
    # the project made known by a worker without Label Studio credentials (with them, /setup would ask the slow one)
    assert create_app(load_settings(**base)).test_client().post("/setup", json={"project": "7", "schema": NER_CONFIG}).status_code == 200
    settings = load_settings(**base, label_studio_url=f"http://127.0.0.1:{server.server_address[1]}", label_studio_api_key=ls_key)
    client = create_app(settings).test_client()
    caplog.set_level(logging.INFO)
    try:
        fallback.start()
        response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7, "label_config": NER_CONFIG}})
        assert response.status_code == 201
        assert answered == []  # Label Studio has not answered yet
        release.set()
        assert wait_until(lambda: "rebuilding project 7 failed" in caplog.text, 60), caplog.text[-2000:]
        assert seen and seen[0][0].startswith("/api/tasks") and "project=7" in seen[0][0]
        assert ls_key not in caplog.text
    finally:
        release.set()
        fallback.cancel()
        server.shutdown()
        server.server_close()
