"""How far /webhook is trusted (learning/webhooks.py; README "How webhooks are trusted").

Open (no basic auth, no Label Studio credentials): anyone who reaches the port may post, so what a
webhook may do is bounded: ids and times in sane ranges, texts and regions and id lists of bounded
size, deletions only of annotations the store holds, guidelines only from an annotation that was
valid, model_version changes coalesced, no warm start, a cap on examples. Authenticated: the
credentials are required (tests/test_auth.py) and the caller is trusted a little more. Verified
(against a real Label Studio): tests/test_trust_label_studio.py.
"""

from __future__ import annotations

import json
import time

import orjson
import pytest

from tests.conftest import NER_CONFIG, annotation_event, deleted_event, span
from tests.processes import wait_until

TEXT = "Jordan signed with the Chicago Bulls in 1984."
GUIDELINES_CONFIG = NER_CONFIG.replace(
    '<Text name="text" value="$text"/>', '<Text name="text" value="$text"/>\n  <TextArea name="instructions" toName="text"/>'
)
AUTH_USER, AUTH_PASS = "robot", "trust-pass-4f1d"
ADA_WITH_GUIDELINES = {"tasks": [{"id": 5, "data": {"text": "Ada"}}], "project": "7.1", "label_config": GUIDELINES_CONFIG}


def store(settings, project="7"):
    from backend.infra.storage import Database
    from backend.learning.store import ExampleStore

    return ExampleStore(Database.in_dir(settings.model_dir), project)


def version(client, project="7", config=NER_CONFIG, **kwargs) -> str:
    response = client.post("/setup", json={"project": project, "schema": config}, **kwargs)
    assert response.status_code == 200, response.json
    return response.json["model_version"]


def raw(client, body: str, **kwargs):
    return client.post("/webhook", data=body.encode("utf-8"), content_type="application/json", **kwargs)


@pytest.fixture
def client(make_client):
    """An app in the open mode, project 7 known (Label Studio called /setup)."""
    return make_client(setup_project="7")


GOOD = annotation_event("ANNOTATION_CREATED", 11, 1, TEXT, [span(TEXT, "Jordan", "PER")])


# ---- numbers and sizes ----
@pytest.mark.parametrize(
    "updated_at",
    ["NaN", "Infinity", "-Infinity", "1e300", '"9999-12-31T00:00:00Z"', '"2999-01-01T00:00:00"', '"1970-01-02T00:00:00Z"',
     '"yesterday"', "true", str(time.time() + 30 * 86400)],
)
def test_updated_at_must_be_a_real_time(client, settings, updated_at):
    body = json.dumps(GOOD).replace('"2025-01-01T10:00:00Z"', updated_at)
    response = raw(client, body)
    assert 400 <= response.status_code < 500, response.json
    assert store(settings).examples() == []


def test_a_real_updated_at_is_taken_as_iso_or_epoch_seconds(client, settings):
    epoch = annotation_event("ANNOTATION_CREATED", 12, 2, TEXT, [], updated_at=1_700_000_000.5)
    assert client.post("/webhook", json=GOOD).status_code == 201
    assert client.post("/webhook", json=epoch).status_code == 201
    assert sorted(e.updated_at for e in store(settings).examples()) == [1_700_000_000.5, 1_735_725_600.0]


def test_a_lone_surrogate_in_a_webhook_is_a_400(client, settings):
    body = json.dumps(annotation_event("ANNOTATION_CREATED", 11, 1, "Ada \ud800 wrote.", []), ensure_ascii=True)
    assert "\\ud800" in body
    response = raw(client, body)
    assert response.status_code == 400 and "JSON" in response.json["error"]
    assert store(settings).examples() == []


@pytest.mark.parametrize(
    "body",
    [
        {**GOOD, "annotation": {**GOOD["annotation"], "id": 2**64}},
        {**GOOD, "annotation": {**GOOD["annotation"], "id": 0}},
        {**GOOD, "annotation": {**GOOD["annotation"], "task": 2**63}, "task": {"id": 2**63, "data": {"text": TEXT}}},
        deleted_event(2**70),
        deleted_event(-1),
    ],
    ids=["annotation-2^64", "annotation-0", "task-2^63", "deleted-2^70", "deleted-negative"],
)
def test_ids_beyond_sqlites_integers_are_a_400(client, settings, body):
    response = raw(client, json.dumps(body))  # the standard encoder: the app's own (orjson) stops at 64 bits
    assert response.status_code == 400, response.json
    assert store(settings).examples() == []


def test_a_predict_with_a_task_id_beyond_64_bits_is_a_400_before_the_llm_is_paid(client, llm):
    body = {"tasks": [{"id": 1, "data": {"text": "Ada"}}, {"id": 2**64, "data": {"text": "Bob"}}], "project": "7.1",
            "label_config": NER_CONFIG}
    response = client.post("/predict", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400 and "tasks.1.id" in response.json["error"]
    assert llm.requests == []


def test_a_webhook_text_longer_than_max_text_chars_is_refused_with_413(make_client, settings):
    client = make_client(setup_project="7", max_text_chars=1000)
    text = "Jordan " * 200
    response = client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, text, [span(text, "Jordan", "PER")]))
    assert response.status_code == 413 and "MAX_TEXT_CHARS=1000" in response.json["error"]
    assert store(settings).examples() == []


def test_an_annotation_with_more_regions_than_one_webhook_may_carry_is_a_413(client, settings):
    from backend.learning.webhooks import MAX_RESULTS

    regions = [span(TEXT, "Jordan", "PER")] * (MAX_RESULTS + 1)
    response = client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, TEXT, regions))
    assert response.status_code == 413 and "annotation.result" in response.json["error"]
    assert store(settings).examples() == []


def test_thousands_of_misplaced_regions_in_a_long_text_are_checked_in_moments(make_client, settings):
    """Span checks were O(text length x regions) in Python: minutes for one webhook of 0.4 MB."""
    client = make_client(setup_project="7", max_text_chars=500_000)
    words = [f"Name{i}" for i in range(4000)]
    text = " ".join(f"{w} went to Paris again." for w in words) * 4  # ~400,000 characters
    assert len(text) > 390_000
    regions = [span(text, w, "PER", start=len(text) - 1 - i, end=len(text) - 1 - i + len(w)) for i, w in enumerate(words)]
    regions += [span(text, f"Absent{i}", "PER", start=i, end=i + 7) for i in range(1000)]
    started = time.perf_counter()
    response = client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, text, regions))
    elapsed = time.perf_counter() - started
    assert response.status_code == 201, response.json
    assert elapsed < 10, f"{elapsed:.1f} s"
    (example,) = store(settings).examples()
    assert all(text[s.start:s.end] == s.text for s in example.spans)
    # re-located where the whole text had to be searched (a budget of 50 searches per annotation)
    assert len(example.spans) >= 50


def test_a_large_webhook_body_is_parsed_once_and_its_project_checked_first(client, monkeypatch):
    parses = []

    def counting(real):
        def loads(data, *args, **kwargs):
            if len(data) > 1_000_000:
                parses.append(len(data))
            return real(data, *args, **kwargs)

        return loads

    monkeypatch.setattr(orjson, "loads", counting(orjson.loads))
    monkeypatch.setattr(json, "loads", counting(json.loads))
    event = annotation_event("ANNOTATION_CREATED", 11, 1, "x" * 2_000_000, [], project=99)
    response = client.post("/webhook", json=event)
    assert response.json == {"status": "ignored", "reason": "unknown project"}
    assert len(parses) == 1


# ---- deletions ----
def test_deletions_apply_only_to_annotations_the_store_holds(client, settings):
    assert client.post("/webhook", json=GOOD).status_code == 201
    response = client.post("/webhook", json=deleted_event(11, 12, 13))
    assert response.status_code == 201
    assert store(settings).examples() == []
    # 12 was never seen: it is not barred for ever, its annotation is learnt when it comes
    later = annotation_event("ANNOTATION_CREATED", 12, 2, "Paris is big.", [span("Paris is big.", "Paris", "LOC")])
    assert client.post("/webhook", json=later).json["outcome"] == "stored"
    # 11 was held and deleted: a late update cannot bring it back
    late = annotation_event("ANNOTATION_UPDATED", 11, 1, TEXT, [span(TEXT, "Jordan", "PER")], updated_at="2025-06-01T00:00:00Z")
    assert client.post("/webhook", json=late).json["outcome"] == "deleted"
    assert [e.annotation_id for e in store(settings).examples()] == [12]


def test_an_authenticated_caller_may_bar_ids_not_seen_yet(make_client, settings):
    client = make_client(basic_auth_user=AUTH_USER, basic_auth_pass=AUTH_PASS)
    auth = {"Authorization": "Basic " + __import__("base64").b64encode(f"{AUTH_USER}:{AUTH_PASS}".encode()).decode()}
    version(client, headers=auth)
    assert client.post("/webhook", json=deleted_event(12), headers=auth).status_code == 201
    later = annotation_event("ANNOTATION_CREATED", 12, 2, "Paris is big.", [span("Paris is big.", "Paris", "LOC")])
    assert client.post("/webhook", json=later, headers=auth).json["outcome"] == "deleted"


def test_a_quarter_million_ids_is_a_413_and_a_hundred_thousand_are_applied(client, settings):
    from backend.learning.webhooks import MAX_DELETED_IDS

    assert client.post("/webhook", json=GOOD).status_code == 201
    too_many = client.post("/webhook", json=deleted_event(*range(1, 250_001)))
    assert too_many.status_code == 413 and "annotations" in too_many.json["error"]
    assert len(store(settings).examples()) == 1
    response = client.post("/webhook", json=deleted_event(*range(1, MAX_DELETED_IDS + 1)))
    assert response.status_code == 201, response.json
    assert store(settings).examples() == []


# ---- guidelines and model_version ----
def test_a_rejected_payload_changes_neither_the_guidelines_nor_the_model_version(make_client, llm):
    client = make_client(setup_project="7")
    before = version(client, config=GUIDELINES_CONFIG)
    event = annotation_event("ANNOTATION_CREATED", 11, 1, TEXT, [
        {"from_name": "instructions", "to_name": "text", "type": "textarea", "value": {"text": ["Label teams as MISC."]}}])
    event["task"]["data"] = {"body": TEXT}  # no text under the config's key: refused
    assert client.post("/webhook", json=event).status_code == 400
    assert version(client, config=GUIDELINES_CONFIG) == before
    llm.gazetteer = {"Ada": "PER"}
    client.post("/predict", json=ADA_WITH_GUIDELINES)
    assert "Label teams as MISC." not in llm.requests[-1]["messages"][0]["content"]


def test_guidelines_longer_than_a_page_are_not_taken(make_client, llm):
    from backend.pipeline.interactive import MAX_GUIDELINES_CHARS

    client = make_client(setup_project="7")
    version(client, config=GUIDELINES_CONFIG)
    box = lambda text: {"from_name": "instructions", "to_name": "text", "type": "textarea", "value": {"text": [text]}}
    short = annotation_event("ANNOTATION_CREATED", 11, 1, TEXT, [box("Teams are ORG.")])
    too_long = box("x" * (MAX_GUIDELINES_CHARS + 1))
    long = annotation_event("ANNOTATION_CREATED", 12, 2, TEXT, [too_long], updated_at="2025-02-01T00:00:00Z")
    assert client.post("/webhook", json=short).status_code == 201
    assert client.post("/webhook", json=long).status_code == 201  # the example is stored, the guidelines are not taken
    client.post("/predict", json=ADA_WITH_GUIDELINES)
    system = llm.requests[-1]["messages"][0]["content"]
    assert "Teams are ORG." in system and "xxxxxxxxxx" not in system


def test_resending_one_correction_with_later_times_keeps_the_model_version(client):
    assert client.post("/webhook", json=GOOD).status_code == 201
    v1 = version(client)
    for hour in range(11, 20):
        later = f"2025-01-01T{hour}:00:00Z"
        again = annotation_event("ANNOTATION_UPDATED", 11, 1, TEXT, [span(TEXT, "Jordan", "PER")], updated_at=later)
        assert client.post("/webhook", json=again).json["outcome"] == "unchanged"
    assert version(client) == v1


def test_a_burst_of_corrections_changes_the_model_version_at_most_once_per_window(make_client, settings):
    client = make_client(setup_project="7", version_coalesce_seconds=60)
    v0 = version(client)
    assert client.post("/webhook", json=GOOD).status_code == 201
    v1 = version(client)
    assert v1 != v0  # the first change after a quiet window shows at once
    fingerprints = {store(settings).fingerprint()}
    for i in range(20):
        text = f"Player {i} signed with the Chicago Bulls."
        event = annotation_event("ANNOTATION_CREATED", 100 + i, 100 + i, text, [span(text, "Chicago Bulls", "ORG")])
        assert client.post("/webhook", json=event).status_code == 201
        fingerprints.add(store(settings).fingerprint())
        assert version(client) == v1
    assert len(fingerprints) == 21  # every one of them was stored


def test_a_published_value_follows_the_newest_once_the_window_has_passed(settings):
    from backend.infra.storage import Database

    db = Database.in_dir(settings.model_dir)
    assert db.published("7", "x", "a", window=10, now=1000.0) == "a"
    assert db.published("7", "x", "b", window=10, now=1001.0) == "b"  # the first change: at once
    assert db.published("7", "x", "c", window=10, now=1005.0) == "b"
    assert db.published("7", "x", "d", window=10, now=1010.9) == "b"
    assert db.published("7", "x", "d", window=10, now=1011.0) == "d"  # the window is over: the newest
    assert db.published("7", "x", "e", window=10, now=1012.0) == "d"
    assert db.published("7", "x", "d", window=10, now=1013.0) == "d"


# ---- warm start, the cap, START_TRAINING ----
def test_warm_start_runs_only_on_an_authenticated_webhook(make_client, llm):
    import base64

    llm.gazetteer = {"Ada": "PER"}
    created = {"action": "TASKS_CREATED", "tasks": [{"id": 1, "data": {"text": "Ada wrote."}}], "project": {"id": 7}}
    open_client = make_client(setup_project="7", warm_start=True)
    response = open_client.post("/webhook", json=created)
    assert response.status_code == 403 and "TASKS_CREATED" in response.json["error"], response.json
    assert llm.requests == []

    auth = {"Authorization": "Basic " + base64.b64encode(f"{AUTH_USER}:{AUTH_PASS}".encode()).decode()}
    trusted = make_client(warm_start=True, basic_auth_user=AUTH_USER, basic_auth_pass=AUTH_PASS)
    version(trusted, headers=auth)
    response = trusted.post("/webhook", json=created, headers=auth)
    assert response.status_code == 201 and response.json["outcome"] == "warm start"
    assert wait_until(lambda: llm.requests, 30), "the warm start's LLM call"
    assert "Ada wrote." in llm.requests[0]["messages"][-1]["content"]


def test_examples_per_project_are_capped_and_held_ones_still_update(make_client, settings):
    client = make_client(setup_project="7", max_examples=2)
    for i in (1, 2):
        assert client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", i, i, TEXT, [])).json["outcome"] == "stored"
    third = client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 3, 3, TEXT, []))
    assert third.status_code == 201 and third.json["outcome"].startswith("full")
    update = annotation_event("ANNOTATION_UPDATED", 1, 1, TEXT, [span(TEXT, "Jordan", "PER")], updated_at="2025-02-01T00:00:00Z")
    assert client.post("/webhook", json=update).json["outcome"] == "stored"
    assert sorted(e.annotation_id for e in store(settings).examples()) == [1, 2]


def test_start_training_rebuilds_a_project_at_most_once_per_interval_whatever_the_worker(make_client, llm):
    from tests.processes import free_port

    nowhere = f"http://127.0.0.1:{free_port()}"  # the rebuild itself fails: what matters is how often it starts
    make_client(setup_project="7")  # the project is known (with Label Studio unreachable, /setup could not check it)
    workers = [make_client(label_studio_url=nowhere, label_studio_api_key="k" * 40) for _ in range(2)]
    event = {"action": "START_TRAINING", "project": {"id": 7}}
    first = workers[0].post("/webhook", json=event)
    assert first.status_code == 201 and first.json["outcome"] == "rebuilding"
    for worker in workers:
        again = worker.post("/webhook", json=event)
        assert again.status_code == 201 and again.json["outcome"] in ("skipped: rebuilt recently", "already rebuilding")
    assert workers[1].post("/webhook", json=event).json["outcome"] == "skipped: rebuilt recently"


# ---- the mode is said once, at start ----
@pytest.mark.parametrize(
    "env, words",
    [
        ({}, "webhook trust: open: /webhook accepts any caller"),
        ({"BASIC_AUTH_USER": AUTH_USER, "BASIC_AUTH_PASS": AUTH_PASS}, "webhook trust: authenticated: /webhook requires"),
        ({"LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "ls-key-0123456789"},
         "webhook trust: verified: /webhook accepts any caller"),
    ],
    ids=["open", "authenticated", "verified"],
)
def test_the_trust_mode_is_logged_once_at_start(backend_factory, env, words):
    backend = backend_factory(workers=2, **env)
    log = backend.log()
    assert log.count("webhook trust:") == 1, log[-2000:]
    assert words in log


def test_open_mode_creates_or_changes_at_most_setup_projects_per_hour_configs(make_client, settings, llm):
    from backend.infra.storage import Database

    client = make_client(setup_projects_per_hour=3)
    for project in ("1", "2", "3"):
        assert client.post("/setup", json={"project": project, "schema": NER_CONFIG}).status_code == 200
    fourth = client.post("/setup", json={"project": "4", "schema": NER_CONFIG})
    assert fourth.status_code == 429 and "SETUP_PROJECTS_PER_HOUR=3" in fourth.json["error"], fourth.json
    assert int(fourth.headers["Retry-After"]) > 0
    assert client.post("/setup", json={"project": "2", "schema": NER_CONFIG}).status_code == 200  # known: no change
    # /predict still answers with its config, which is not stored
    llm.gazetteer = {"Ada": "PER"}
    answer = client.post("/predict", json={"tasks": [{"id": 1, "data": {"text": "Ada"}}], "project": "5.1", "label_config": NER_CONFIG})
    assert answer.status_code == 200 and answer.json["results"][0]["result"]
    db = Database.in_dir(settings.model_dir)
    assert [db.label_config(p) is not None for p in "12345"] == [True, True, True, False, False]
