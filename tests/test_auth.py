"""Basic auth: every route but /health and / needs it, /webhook included; Label Studio's "basic auth"
setting passes it, and its webhook is given the credentials by `llm-ner connect` or by the backend
itself (tests/test_trust.py, tests/test_trust_label_studio.py)."""

from __future__ import annotations

import base64
import re

import httpx
import pytest

from tests.conftest import NER_CONFIG, region_tuples
from tests.processes import wait_until

USER, PASSWORD = "ls-robot", "basic-pass-9f3a1c77"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


GOOD = basic(USER, PASSWORD)


@pytest.fixture
def client(settings):
    from backend.protocol.server import create_app

    secured = settings.model_copy(update={"basic_auth_user": USER, "basic_auth_pass": __import__("pydantic").SecretStr(PASSWORD)})
    return create_app(secured).test_client()


def setup_body(project="4", config=NER_CONFIG):
    return {"project": project, "schema": config}


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("post", "/setup", setup_body()),
        ("post", "/predict", {"tasks": [{"id": 1, "data": {"text": "x"}}], "project": "4", "label_config": NER_CONFIG}),
        ("get", "/metrics", None),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic(USER, "wrong"),
        basic("someone", PASSWORD),
        basic(USER, PASSWORD + "x"),
        basic(USER, PASSWORD[:-1]),
        {"Authorization": "Bearer " + PASSWORD},
        {"Authorization": "Basic !!!not-base64"},
    ],
    ids=["none", "wrong-pass", "wrong-user", "longer-pass", "shorter-pass", "bearer", "garbage"],
)
def test_protected_routes_refuse_missing_or_wrong_credentials_with_401_json(client, llm, method, path, body, headers):
    response = getattr(client, method)(path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.json == {"error": "authentication required"}
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert PASSWORD not in response.get_data(as_text=True)
    assert llm.requests == []  # refused before any work


def test_protected_routes_answer_with_the_right_credentials(client, llm):
    llm.gazetteer = {"Oslo": "LOC"}
    assert client.post("/setup", json=setup_body(), headers=GOOD).status_code == 200
    response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"text": "Oslo"}}], "project": "4"}, headers=GOOD)
    assert response.status_code == 200
    assert region_tuples(response.json["results"][0]["result"], "text") == ["Oslo"]
    assert client.get("/metrics", headers=GOOD).status_code == 200


@pytest.mark.parametrize("path", ["/", "/health"])
def test_health_needs_no_credentials(client, path):
    assert client.get(path).status_code == 200


def annotation_event(project_id, text="Ada wrote.", start=0, end=3, label="PER"):
    region = {"from_name": "label", "to_name": "text", "type": "labels",
              "value": {"start": start, "end": end, "text": text[start:end], "labels": [label]}}
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 11, "task": 1, "result": [region], "was_cancelled": False, "ground_truth": False},
        "task": {"id": 1, "data": {"text": text}},
        "project": {"id": project_id},
    }


@pytest.mark.parametrize(
    "headers", [{}, basic(USER, "wrong"), {"Authorization": "Basic !!!not-base64"}], ids=["none", "wrong", "garbage"]
)
def test_webhook_refuses_missing_or_wrong_credentials_like_every_route(client, settings, headers):
    client.post("/setup", json=setup_body(project="4"), headers=GOOD)
    response = client.post("/webhook", json=annotation_event(4), headers=headers)
    assert response.status_code == 401 and response.json == {"error": "authentication required"}
    from backend.infra.storage import Database
    from backend.learning.store import ExampleStore

    assert ExampleStore(Database.in_dir(settings.model_dir), "4").examples() == []


def test_webhook_with_the_credentials_learns(client):
    client.post("/setup", json=setup_body(project="4"), headers=GOOD)
    response = client.post("/webhook", json=annotation_event(4), headers=GOOD)
    assert response.status_code == 201
    assert response.json == {"status": "ok", "outcome": "stored"}


def test_webhook_ignores_projects_no_authenticated_setup_made_known(client):
    event = annotation_event(77)
    event["project"]["label_config"] = NER_CONFIG
    response = client.post("/webhook", json=event, headers=GOOD)
    assert response.status_code == 200
    assert response.json == {"status": "ignored", "reason": "unknown project"}


def test_webhook_cannot_swap_a_projects_label_config(client, llm):
    """An unauthenticated caller sending another config must not change what /predict labels."""
    client.post("/setup", json=setup_body(project="4"), headers=GOOD)
    version = client.post("/setup", json=setup_body(project="4"), headers=GOOD).json["model_version"]
    evil = NER_CONFIG.replace('value="PER"', 'value="EVIL"')
    client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 4, "label_config": evil}}, headers=GOOD)
    llm.gazetteer = {"Ada": "PER"}
    response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"text": "Ada"}}], "project": "4"}, headers=GOOD)
    assert response.json["model_version"] == version
    assert region_tuples(response.json["results"][0]["result"], "label") == ["PER"]


def test_an_unauthenticated_setup_does_not_make_a_project_known_to_webhooks(client):
    assert client.post("/setup", json=setup_body(project="999")).status_code == 401
    response = client.post("/webhook", json=annotation_event(999), headers=GOOD)
    assert response.json["reason"] == "unknown project"


# ---- against a real Label Studio 1.23.2 ----


def counter(metrics_text: str, endpoint: str, status: str) -> float:
    pattern = rf'llm_ner_requests_total\{{endpoint="{re.escape(endpoint)}",status="{status}"\}} ([0-9.e+]+)'
    return sum(float(v) for v in re.findall(pattern, metrics_text))


@pytest.mark.label_studio
def test_label_studio_basic_auth_setting_connects_and_predicts_and_its_unsecured_webhook_is_refused_loudly(
    connected_project, backend_factory, llm
):
    llm.gazetteer = {"Grace Hopper": "PER", "Navy": "ORG"}
    backend = backend_factory(workers=2, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD)
    assert httpx.post(backend.url + "/setup", json=setup_body()).status_code == 401

    project = connected_project(["Grace Hopper joined the Navy."], title="basic auth", backend=backend,
                                auth_method="BASIC_AUTH", basic_auth_user=USER, basic_auth_pass=PASSWORD)
    ls, ml = project.ls, project.ml
    assert ls.ml.get(id=ml.id).state in ("CO", "CONNECTED"), ls.ml.get(id=ml.id)

    task = project.open_next_task()
    (prediction,) = project.predictions(task["id"])
    assert sorted(region_tuples(prediction.result, "text", "label")) == [("Grace Hopper", "PER"), ("Navy", "ORG")]

    # Label Studio made the webhook without the credentials, and the backend cannot add them without
    # LABEL_STUDIO_URL/API_KEY: the webhook is refused, and the log says what to do
    # (tests/test_trust_label_studio.py: `llm-ner connect`, or the backend securing it itself)
    ls.annotations.create(id=task["id"], result=prediction.result)
    refused = lambda: counter(httpx.get(backend.url + "/metrics", headers=GOOD).text, "/webhook", "401") >= 1
    assert wait_until(refused, 30), "Label Studio's ANNOTATION_CREATED webhook to arrive"
    assert "run `llm-ner connect --project ID`" in backend.log()
    text = httpx.get(backend.url + "/metrics", headers=GOOD).text
    assert counter(text, "/setup", "401") == 1  # only our own unauthenticated probe above
    assert counter(text, "/predict", "401") == 0
    assert PASSWORD not in backend.log()
