"""Webhooks you can trust, against a real Label Studio 1.23.2.

- Basic auth on, `llm-ner connect` run: the project's webhook carries the credentials, fit() still
  learns from what annotators submit, a forged webhook (no credentials) is refused; a second run
  changes nothing.
- Basic auth on, the backend holding Label Studio credentials, the model connected through the API
  (what the UI does): the backend secures the webhook itself after /setup; the same outcome.
- Label Studio credentials only (verified mode): what a webhook says is read back from Label Studio,
  so a forged payload teaches nothing and a forged deletion deletes nothing.
"""

from __future__ import annotations

import base64
import subprocess
import sys

import httpx
import pytest

from tests.conftest import NER_CONFIG, annotation_event, deleted_event, span
from tests.processes import REPO, wait_until

pytestmark = pytest.mark.label_studio

USER, PASSWORD = "ls-robot", "trust-basic-pass-77c1"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
TEXTS = ["Jordan signed with the Chicago Bulls in 1984.", "Pippen joined the Chicago Bulls in 1987."]


def store(backend, project_id: int):
    from backend.infra.storage import Database
    from backend.learning.store import ExampleStore

    return ExampleStore(Database.in_dir(backend.env["MODEL_DIR"]), str(project_id))


def learned(backend, project_id: int) -> list[tuple[int, list[tuple[str, str]]]]:
    return [(e.annotation_id, [(s.text, s.label) for s in e.spans]) for e in store(backend, project_id).examples()]


def new_project(label_studio, title: str):
    ls = label_studio.client()
    project = ls.projects.create(title=title, label_config=NER_CONFIG)
    ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in TEXTS])
    tasks = sorted(ls.tasks.list(project=project.id), key=lambda t: t.id)
    return ls, project, tasks


def webhook_headers(ls, project_id: int) -> list[dict]:
    return [dict(h.headers or {}) for h in ls.webhooks.list(project=str(project_id)) if h.project == project_id]


def run_connect(backend, label_studio, project_id: int) -> subprocess.CompletedProcess:
    env = {**backend.env, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}
    return subprocess.run(
        [sys.executable, "-m", "backend", "connect", "--project", str(project_id), "--backend-url", backend.url],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def forged_update(project_id: int, annotation_id: int, task_id: int) -> dict:
    text = "Evil Corp owns everything."
    return annotation_event("ANNOTATION_UPDATED", annotation_id, task_id, text, [span(text, "Evil Corp", "PER")],
                            updated_at="2026-01-01T00:00:00Z", project=project_id)


def test_after_llm_ner_connect_fit_learns_with_basic_auth_on_and_a_forged_webhook_is_refused(label_studio, backend_factory, llm):
    backend = backend_factory(workers=2, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD)
    ls, project, tasks = new_project(label_studio, "connect cli")

    done = run_connect(backend, label_studio, project.id)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"connected {backend.url} to project {project.id} as model ")
    assert "with basic auth as 'ls-robot'" in lines[0]
    assert any("now sends the backend's basic auth" in line for line in lines), lines
    assert lines[-1].startswith("Label Studio reaches the backend: /health and /setup answered")
    assert PASSWORD not in done.stdout + done.stderr
    (ml,) = ls.ml.list(project=project.id)
    assert (ml.auth_method, ml.basic_auth_user, ml.state) == ("BASIC_AUTH", USER, "CO")
    assert webhook_headers(ls, project.id) == [AUTH]
    assert ls.projects.get(id=project.id).show_collab_predictions is True

    # an annotator's correction reaches fit() through the secured webhook
    text = tasks[0].data["text"]
    annotation = ls.annotations.create(id=tasks[0].id, result=[span(text, "Jordan", "PER"), span(text, "Chicago Bulls", "ORG")])
    assert wait_until(lambda: learned(backend, project.id), 30), "the annotation to reach the backend"
    assert learned(backend, project.id) == [(annotation.id, [("Jordan", "PER"), ("Chicago Bulls", "ORG")])]

    # whoever sends no credentials is refused, and changes nothing
    forged = httpx.post(backend.url + "/webhook", json=forged_update(project.id, annotation.id, tasks[0].id))
    assert forged.status_code == 401
    assert learned(backend, project.id) == [(annotation.id, [("Jordan", "PER"), ("Chicago Bulls", "ORG")])]

    # connecting again changes nothing
    again = run_connect(backend, label_studio, project.id)
    assert again.returncode == 0, again.stderr
    assert "was already connected" in again.stdout
    assert "already sends the backend's basic auth" in again.stdout
    assert "predictions were already used" in again.stdout
    assert len(ls.ml.list(project=project.id)) == 1 and webhook_headers(ls, project.id) == [AUTH]


def test_connect_says_what_failed_when_label_studio_cannot_reach_the_backend(label_studio, backend_factory, tmp_path):
    from tests.processes import free_port

    backend = backend_factory(workers=1, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD)
    _, project, _ = new_project(label_studio, "connect nowhere")

    class Nowhere:
        url = f"http://127.0.0.1:{free_port()}"
        env = backend.env

    done = run_connect(Nowhere, label_studio, project.id)
    assert done.returncode == 1
    assert done.stderr.startswith("llm-ner: connecting http://127.0.0.1:")
    assert "ML_BLOCK_LOCAL_IP=false" in done.stderr and "Traceback" not in done.stderr


def test_with_label_studio_credentials_the_backend_secures_its_webhook_itself(label_studio, backend_factory, llm):
    backend = backend_factory(workers=2, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD,
                              LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token)
    ls, project, tasks = new_project(label_studio, "connect api")
    # what "Connect Model" in the UI does, with the basic-auth pair
    ls.ml.create(url=backend.url, project=project.id, title="llm-ner", is_interactive=False,
                 auth_method="BASIC_AUTH", basic_auth_user=USER, basic_auth_pass=PASSWORD)
    assert wait_until(lambda: webhook_headers(ls, project.id) == [AUTH], 30), webhook_headers(ls, project.id)

    text = tasks[1].data["text"]
    annotation = ls.annotations.create(id=tasks[1].id, result=[span(text, "Pippen", "PER")])
    assert wait_until(lambda: learned(backend, project.id), 30), "the annotation to reach the backend"
    assert learned(backend, project.id) == [(annotation.id, [("Pippen", "PER")])]

    forged = httpx.post(backend.url + "/webhook", json=forged_update(project.id, annotation.id, tasks[1].id))
    assert forged.status_code == 401
    # with the credentials, a payload still teaches only what Label Studio holds (verified)
    replayed = httpx.post(backend.url + "/webhook", json=forged_update(project.id, annotation.id, tasks[1].id), headers=AUTH)
    assert replayed.status_code == 201 and replayed.json()["outcome"] == "unchanged"
    assert learned(backend, project.id) == [(annotation.id, [("Pippen", "PER")])]
    assert PASSWORD not in backend.log() and label_studio.token not in backend.log()


def test_verified_webhooks_teach_what_label_studio_holds_not_what_the_payload_says(label_studio, backend_factory, llm):
    backend = backend_factory(workers=2, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token)
    ls, project, tasks = new_project(label_studio, "verified")
    ls.ml.create(url=backend.url, project=project.id, title="llm-ner", is_interactive=False)
    text = tasks[0].data["text"]
    annotation = ls.annotations.create(id=tasks[0].id, result=[span(text, "Jordan", "PER")])
    assert wait_until(lambda: learned(backend, project.id), 30), "Label Studio's own webhook"
    genuine = [(annotation.id, [("Jordan", "PER")])]
    assert learned(backend, project.id) == genuine

    post = lambda body: httpx.post(backend.url + "/webhook", json=body)
    # a forged update of a real annotation: Label Studio's version is what counts
    assert post(forged_update(project.id, annotation.id, tasks[0].id)).json()["outcome"] == "unchanged"
    # an annotation Label Studio does not have: nothing learnt
    invented = post(forged_update(project.id, 987_654, tasks[1].id))
    assert invented.status_code == 201 and invented.json()["outcome"] == "gone"
    # a real annotation said to belong to another task: refused
    assert post(forged_update(project.id, annotation.id, tasks[1].id)).status_code == 400
    # a forged deletion: Label Studio still has it, nothing is deleted
    assert post(deleted_event(annotation.id, project=project.id)).status_code == 201
    assert learned(backend, project.id) == genuine

    # a genuine deletion (Label Studio's own ANNOTATIONS_DELETED) is applied
    ls.annotations.delete(id=annotation.id)
    assert wait_until(lambda: learned(backend, project.id) == [], 30), "the deletion to reach the backend"


# ---- verified mode, in-process against the same Label Studio: the probe's findings (issue 26) ----
@pytest.fixture
def verified_app(make_settings, label_studio):
    from backend.protocol.server import create_app

    def make(**overrides):
        return create_app(make_settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token, **overrides))

    return make


def test_verified_mode_starts_cancels_and_reconfigures_nothing_for_an_unproven_caller(label_studio, verified_app, llm):
    app = verified_app()
    client = app.test_client()
    ls, project, tasks = new_project(label_studio, "verified jobs")
    assert client.post("/setup", json={"project": str(project.id), "schema": NER_CONFIG}).status_code == 200  # Label Studio's own

    # a whole-project job, unauthenticated: refused, nothing paid, nothing written
    started = client.post("/jobs", json={"project": project.id, "scope": "all", "concurrency": 256})
    assert started.status_code == 403 and "Token" in started.json["error"], started.json
    wrong = client.post("/jobs", json={"project": project.id}, headers={"Authorization": "Token " + "0" * 40})
    assert wrong.status_code == 403
    assert client.get("/jobs").json["jobs"] == [] and llm.requests == []

    # someone's job: a stranger cannot cancel it; its owner's key can
    from backend.pipeline.jobs.records import JobSpec

    jobs = app.extensions["llm_ner"]["services"].jobs
    job_id = jobs.create(JobSpec(project.id, "missing", None, 1, None), "v", 2)
    assert client.delete(f"/jobs/{job_id}").status_code == 403 and not jobs.cancel_requested(job_id)
    assert client.delete(f"/jobs/{job_id}", headers={"Authorization": f"Token {label_studio.token}"}).status_code == 202
    assert jobs.cancel_requested(job_id)
    jobs.finish(job_id, "cancelled")

    # a label config that is not Label Studio's is not stored: a genuine PER correction keeps its span
    forged = NER_CONFIG.replace('value="PER"', 'value="PERSON"')
    refused = client.post("/setup", json={"project": str(project.id), "schema": forged})
    assert refused.status_code == 403 and "label config" in refused.json["error"]
    text = tasks[0].data["text"]
    annotation = ls.annotations.create(id=tasks[0].id, result=[span(text, "Jordan", "PER")])
    event = annotation_event("ANNOTATION_CREATED", annotation.id, tasks[0].id, text, [], project=project.id)
    assert client.post("/webhook", json=event).json["outcome"] == "stored"
    assert learned_in(app, project.id) == [(annotation.id, [("Jordan", "PER")])]


def learned_in(app, project_id: int):
    from backend.learning.store import ExampleStore

    db = app.extensions["llm_ner"]["services"].db
    return [(e.annotation_id, [(s.text, s.label) for s in e.spans]) for e in ExampleStore(db, str(project_id)).examples()]


def test_verified_mode_never_bars_annotation_ids_label_studio_has_not_given_out(label_studio, verified_app, llm):
    app = verified_app()
    client = app.test_client()
    ls, project, tasks = new_project(label_studio, "verified future ids")
    assert client.post("/setup", json={"project": str(project.id), "schema": NER_CONFIG}).status_code == 200
    text = tasks[0].data["text"]
    first = ls.annotations.create(id=tasks[0].id, result=[span(text, "Jordan", "PER")])
    for future in range(first.id + 1, first.id + 6):  # the next five ids, not made yet
        forged = annotation_event("ANNOTATION_CREATED", future, tasks[1].id, "x", [], project=project.id)
        assert client.post("/webhook", json=forged).json["outcome"] == "gone"
    # annotators then make them: every correction is learnt, none refused as deleted
    made = []
    for _ in range(5):
        task = tasks[1]
        annotation = ls.annotations.create(id=task.id, result=[span(task.data["text"], "Pippen", "PER")])
        made.append(annotation.id)
        event = annotation_event("ANNOTATION_CREATED", annotation.id, task.id, task.data["text"], [], project=project.id)
        assert client.post("/webhook", json=event).json["outcome"] == "stored"
    assert set(made) & set(range(first.id + 1, first.id + 6)), (first.id, made)  # ids the forger named
    # (a task's example is its latest annotation; the first annotation was never announced)
    assert learned_in(app, project.id) == [(made[-1], [("Pippen", "PER")])]


def test_forged_tasks_created_naming_existing_tasks_pays_for_nothing(label_studio, verified_app, llm):
    """3 forged TASKS_CREATED naming the project's tasks: those Label Studio shows as predicted,
    annotated, or created before WARM_START_WINDOW are not new work: no LLM call at all."""
    import time

    app = verified_app(warm_start=True, warm_start_window=0.5)
    client = app.test_client()
    ls = label_studio.client()
    project = ls.projects.create(title="verified warm start", label_config=NER_CONFIG)
    ls.projects.import_tasks(id=project.id, request=[{"text": f"Ada number {i} lives in Oslo."} for i in range(30)])
    tasks = sorted(ls.tasks.list(project=project.id), key=lambda t: t.id)
    for task in tasks[:10]:
        ls.predictions.create(task=task.id, result=[], model_version="earlier")
    for task in tasks[10:20]:
        ls.annotations.create(id=task.id, result=[])
    time.sleep(1.0)  # the other ten are now older than WARM_START_WINDOW (0.5 s): not new
    assert client.post("/setup", json={"project": str(project.id), "schema": NER_CONFIG}).status_code == 200
    llm.gazetteer = {"Ada": "PER", "Oslo": "LOC"}
    forged = {"action": "TASKS_CREATED", "project": {"id": project.id}, "tasks": [{"id": t.id} for t in tasks]}
    for _ in range(3):
        response = client.post("/webhook", json=forged)
        assert response.status_code == 201 and response.json["outcome"] == "no tasks", response.json
    assert llm.requests == []
