"""Strict input types on /jobs, /predict, /setup and /webhook (issue 26, item 4).

pydantic's lax rules take `true` as 1, "3" as 3 and "yes" as True: `{"project": true}` targeted
project 1, `{"batch_api": "yes"}` started a Batch API job, `/predict` took task id -1 and `true`.
Each of these is now a 400 whose message names the field, before anything is read, paid or stored.
"""

from __future__ import annotations

import pytest

from tests.conftest import NER_CONFIG, annotation_event, span
from tests.processes import free_port

TEXT = "Jordan signed with the Chicago Bulls in 1984."


@pytest.fixture
def verified(make_client):
    """Verified mode (Label Studio credentials set) with a Label Studio that is not there: a body that
    passed validation would be answered 503 (Label Studio could not be asked), never 400."""
    return make_client(label_studio_url=f"http://127.0.0.1:{free_port()}", label_studio_api_key="k" * 40)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"project": True}, "project"),
        ({"project": "3"}, "project"),
        ({"project": 3.0}, "project"),
        ({"project": 0}, "project"),
        ({"project": -1}, "project"),
        ({"project": 2**63}, "project"),
        ({"project": 3, "batch_api": "yes"}, "batch_api"),
        ({"project": 3, "batch_api": 1}, "batch_api"),
        ({"project": 3, "limit": True}, "limit"),
        ({"project": 3, "limit": "10"}, "limit"),
        ({"project": 3, "concurrency": "8"}, "concurrency"),
        ({"project": 3, "max_cost": "1.5"}, "max_cost"),
        ({"project": 3, "scope": 1}, "scope"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else "-".join(f"{k}={v[k]!r}" for k in v),
)
def test_jobs_refuses_loose_types_naming_the_field(verified, llm, body, field):
    response = verified.post("/jobs", json=body)
    assert response.status_code == 400, response.json
    assert response.json["error"].startswith(f"{field}:"), response.json
    assert llm.requests == []


@pytest.mark.parametrize("task_id", [-1, 0, True, False, "5", 5.0, 2**63], ids=repr)
def test_predict_refuses_a_task_id_that_is_not_an_integer_from_1(make_client, llm, task_id):
    client = make_client()
    llm.gazetteer = {"Ada": "PER"}
    body = {"tasks": [{"id": 1, "data": {"text": "Ada"}}, {"id": task_id, "data": {"text": "Ada"}}],
            "project": "7.1", "label_config": NER_CONFIG}
    response = client.post("/predict", json=body)
    assert response.status_code == 400, response.json
    assert response.json["error"].startswith("tasks.1.id:"), response.json
    assert llm.requests == []


def test_predict_refuses_a_label_config_that_is_not_a_string(make_client, llm):
    response = make_client().post("/predict", json={"tasks": [{"id": 1, "data": {"text": "Ada"}}], "project": "7.1",
                                                    "label_config": 1})
    assert response.status_code == 400 and response.json["error"].startswith("label_config:"), response.json


@pytest.mark.parametrize(
    "extra, field",
    [({"project": True}, "project"), ({"schema": 1}, "schema"), ({"model_version": 3}, "model_version"),
     ({"hostname": 1}, "hostname")],
    ids=["project-true", "schema-number", "model_version-number", "hostname-number"],
)
def test_setup_refuses_loose_types_naming_the_field(make_client, settings, extra, field):
    from backend.infra.storage import Database

    response = make_client().post("/setup", json={"project": "7", "schema": NER_CONFIG, **extra})
    assert response.status_code == 400, response.json
    assert field in response.json["error"].split(":")[0], response.json
    assert Database.in_dir(settings.model_dir).label_config("7") is None


GOOD = annotation_event("ANNOTATION_CREATED", 11, 1, TEXT, [span(TEXT, "Jordan", "PER")])


@pytest.mark.parametrize(
    "body, field",
    [
        ({**GOOD, "annotation": {**GOOD["annotation"], "id": True}}, "annotation.id"),
        ({**GOOD, "annotation": {**GOOD["annotation"], "id": "11"}}, "annotation.id"),
        ({**GOOD, "annotation": {**GOOD["annotation"], "id": 11.0}}, "annotation.id"),
        ({**GOOD, "annotation": {**GOOD["annotation"], "was_cancelled": "yes"}}, "annotation.was_cancelled"),
        ({**GOOD, "annotation": {**GOOD["annotation"], "was_cancelled": 1}}, "annotation.was_cancelled"),
        ({**GOOD, "annotation": {**GOOD["annotation"], "task": "1"}, "task": {"id": "1", "data": {"text": TEXT}}},
         "annotation.task"),
        ({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": "11"}], "project": {"id": 7}}, "annotations[0].id"),
        ({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": True}], "project": {"id": 7}}, "annotations[0].id"),
        ({"action": True, "project": {"id": 7}}, "action"),
    ],
    ids=["id-true", "id-string", "id-float", "cancelled-yes", "cancelled-1", "task-string", "deleted-string",
         "deleted-true", "action-true"],
)
def test_webhooks_refuse_loose_types_naming_the_field(make_client, settings, body, field):
    from backend.infra.storage import Database
    from backend.learning.store import ExampleStore

    client = make_client(setup_project="7")
    assert client.post("/webhook", json=GOOD).json["outcome"] == "stored"
    response = client.post("/webhook", json=body)
    assert response.status_code == 400, response.json
    assert response.json["error"].startswith(field), response.json
    # nothing changed: the one stored example is still there, as it was
    (example,) = ExampleStore(Database.in_dir(settings.model_dir), "7").examples()
    assert (example.annotation_id, [(s.text, s.label) for s in example.spans]) == (11, [("Jordan", "PER")])


def test_tasks_created_refuses_an_id_that_is_not_an_integer(make_client, llm):
    import base64

    from tests.test_trust import AUTH_PASS, AUTH_USER, version

    auth = {"Authorization": "Basic " + base64.b64encode(f"{AUTH_USER}:{AUTH_PASS}".encode()).decode()}
    client = make_client(warm_start=True, basic_auth_user=AUTH_USER, basic_auth_pass=AUTH_PASS)
    version(client, headers=auth)
    created = {"action": "TASKS_CREATED", "tasks": [{"id": "1", "data": {"text": "Ada wrote."}}], "project": {"id": 7}}
    response = client.post("/webhook", json=created, headers=auth)
    assert response.status_code == 400 and response.json["error"].startswith("tasks[0].id"), response.json
    assert llm.requests == []
