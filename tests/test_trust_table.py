"""The trust table (backend/protocol/trust.py) walked cell by cell, in every mode.

For each row and mode, a probe does what the row names (a label config stored, an annotation learnt,
a deletion applied, a warm start paid, a job started...) and says whether it happened. The walk
proves each cell two ways: with exactly the proofs the cell lists, it happens; without any one of
them (no credentials, no Label Studio key, a forged payload instead of what Label Studio holds), it
does not. A refused cell never happens, whatever is sent. Verified modes run against a real Label
Studio 1.23.2, a new project per probe. Also: every route of the server is a row, every row has a
probe, and the docs show the table as the code has it.
"""

from __future__ import annotations

import base64
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backend.protocol import trust
from backend.protocol.trust import Mode, Proof
from tests.conftest import NER_CONFIG, annotation_event, deleted_event, span
from tests.processes import wait_until

USER, PASSWORD = "table-robot", "table-pass-51e0"
FORGED_CONFIG = NER_CONFIG.replace("</Labels>", '  <Label value="FORGED"/>\n  </Labels>')
TEXTS = ["Jordan signed with the Chicago Bulls in 1984.", "Pippen joined the Chicago Bulls in 1987."]
_ids = itertools.count(5_000)


@dataclass
class Env:
    mode: Mode
    client: Any
    app: Any
    llm: Any
    label_studio: Any = None  # the session's Label Studio, in the verified modes
    ls: Any = None  # its SDK client
    projects: list = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return self.mode in (Mode.VERIFIED, Mode.BOTH)

    def headers(self, credentials: bool = True, token: bool = False) -> dict[str, str]:
        if token and self.label_studio is not None:
            return {"Authorization": f"Token {self.label_studio.token}"}
        if credentials and self.mode in (Mode.AUTHENTICATED, Mode.BOTH):
            return {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
        return {}

    def project(self) -> tuple[int, list[tuple[int, str]]]:
        """A new project: (id, [(task id, text)]), in Label Studio when the mode reads it."""
        if not self.verified:
            return next(_ids), [(next(_ids), t) for t in TEXTS]
        project = self.ls.projects.create(title=f"table {len(self.projects)}", label_config=NER_CONFIG)
        self.projects.append(project.id)
        return project.id, self.import_tasks(project.id, TEXTS)

    def import_tasks(self, project_id: int, texts: list[str]) -> list[tuple[int, str]]:
        if not self.verified:
            return [(next(_ids), t) for t in texts]
        before = {t.id for t in self.ls.tasks.list(project=project_id)}
        self.ls.projects.import_tasks(id=project_id, request=[{"text": t} for t in texts])
        return sorted((t.id, t.data["text"]) for t in self.ls.tasks.list(project=project_id) if t.id not in before)

    def setup(self, project_id: int) -> None:
        response = self.client.post("/setup", json={"project": str(project_id), "schema": NER_CONFIG}, headers=self.headers())
        assert response.status_code == 200, response.json

    def annotate(self, project_id: int, task: tuple[int, str], surface: str, label: str) -> int:
        """An annotation as Label Studio holds it (verified modes), else an id of our own."""
        if not self.verified:
            return next(_ids)
        return self.ls.annotations.create(id=task[0], result=[span(task[1], surface, label)]).id

    def stored(self, project_id: int) -> dict[int, list[tuple[str, str]]]:
        from backend.learning.store import ExampleStore

        db = self.app.extensions["llm_ner"]["services"].db
        return {e.annotation_id: [(s.text, s.label) for s in e.spans] for e in ExampleStore(db, str(project_id)).examples()}

    def config(self, project_id: int) -> str | None:
        return self.app.extensions["llm_ner"]["services"].db.label_config(str(project_id))

    def webhook(self, body: dict, **proofs: bool) -> Any:
        return self.client.post("/webhook", json=body, headers=self.headers(**proofs))


# ---- one probe per row: did the thing happen? (credentials, token: sent or not; genuine: what Label Studio holds, or forged) ----
def _status(path: str, method: str = "get"):
    def probe(env: Env, credentials: bool, token: bool, genuine: bool) -> bool:
        return getattr(env.client, method)(path, headers=env.headers(credentials, token)).status_code == 200
    return probe


def probe_setup_same(env, credentials, token, genuine):
    project, _ = env.project()
    env.setup(project)
    response = env.client.post("/setup", json={"project": str(project), "schema": NER_CONFIG}, headers=env.headers(credentials, token))
    return response.status_code == 200


def probe_setup_new(env, credentials, token, genuine):
    project, _ = env.project()
    sent = NER_CONFIG if genuine else FORGED_CONFIG
    response = env.client.post("/setup", json={"project": str(project), "schema": sent}, headers=env.headers(credentials, token))
    happened = env.config(project) == sent
    assert happened == (response.status_code == 200), response.json
    return happened


def probe_predict(env, credentials, token, genuine):
    project, tasks = env.project()
    env.setup(project)
    body = {"tasks": [{"id": tasks[0][0], "data": {"text": tasks[0][1]}}], "project": f"{project}.1"}
    response = env.client.post("/predict", json=body, headers=env.headers(credentials, token))
    return response.status_code == 200 and len(response.json["results"]) == 1


def probe_predict_config(env, credentials, token, genuine):
    project, tasks = env.project()
    sent = NER_CONFIG if genuine else FORGED_CONFIG
    body = {"tasks": [{"id": tasks[0][0], "data": {"text": tasks[0][1]}}], "project": f"{project}.1", "label_config": sent}
    response = env.client.post("/predict", json=body, headers=env.headers(credentials, token))
    return response.status_code == 200 and env.config(project) == sent


def probe_webhook(env, credentials, token, genuine):
    project, _ = env.project()
    env.setup(project)
    return env.webhook({"action": "PROJECT_UPDATED", "project": {"id": project}}, credentials=credentials, token=token).status_code == 201


def probe_annotation(env, credentials, token, genuine):
    project, tasks = env.project()
    env.setup(project)
    task_id, text = tasks[0]
    annotation = env.annotate(project, tasks[0], "Jordan", "PER")
    claimed = [span(text, "Jordan", "PER")] if genuine else [span(text, "Chicago Bulls", "PER")]
    event = annotation_event("ANNOTATION_CREATED", annotation, task_id, text, claimed, updated_at="2026-01-01T00:00:00Z",
                             project=project)
    response = env.webhook(event, credentials=credentials, token=token)
    learnt = env.stored(project).get(annotation) == [(s["value"]["text"], s["value"]["labels"][0]) for s in claimed]
    return response.status_code == 201 and learnt


def probe_deleted(env, credentials, token, genuine):
    project, tasks = env.project()
    env.setup(project)
    task_id, text = tasks[0]
    annotation = env.annotate(project, tasks[0], "Jordan", "PER")
    event = annotation_event("ANNOTATION_CREATED", annotation, task_id, text, [span(text, "Jordan", "PER")], project=project)
    assert env.webhook(event).json["outcome"] == "stored"
    if genuine and env.verified:
        env.ls.annotations.delete(id=annotation)
    response = env.webhook(deleted_event(annotation, project=project), credentials=credentials, token=token)
    return response.status_code == 201 and annotation not in env.stored(project)


def probe_training(env, credentials, token, genuine):
    project, tasks = env.project()
    env.setup(project)
    real = env.annotate(project, tasks[1], "Pippen", "PER")
    forged = next(_ids)
    body = {"action": "START_TRAINING", "project": {"id": project},
            "annotations": [{"id": forged, "task": tasks[0][0], "result": [span(tasks[0][1], "Jordan", "ORG")]}]}
    response = env.webhook(body, credentials=credentials, token=token)
    if response.status_code != 201:
        return False
    assert wait_until(lambda: real in env.stored(project), 60), "the rebuild from Label Studio"
    return real in env.stored(project) if genuine else forged in env.stored(project)


def probe_warm_start(env, credentials, token, genuine):
    project, old = env.project()
    env.setup(project)
    marker = f"Warmstart{next(_ids)}"
    new = env.import_tasks(project, [f"{marker} met Ada in Oslo."])
    if not genuine and env.verified:  # tasks Label Studio shows as predicted already: not new work
        for task_id, _ in old:
            env.ls.predictions.create(task=task_id, result=[], model_version="earlier")
    named = new if genuine else old
    body = {"action": "TASKS_CREATED", "project": {"id": project}, "tasks": [{"id": i, "data": {"text": t}} for i, t in named]}
    response = env.webhook(body, credentials=credentials, token=token)
    if response.status_code != 201 or response.json["outcome"] != "warm start":
        return False
    texts = [t for _, t in named]
    return wait_until(lambda: all(any(t in str(r["messages"]) for r in env.llm.requests) for t in texts), 60)


def probe_jobs_get(env, credentials, token, genuine):
    return env.client.get("/jobs/nope", headers=env.headers(credentials, token)).status_code == 404


def probe_jobs_post(env, credentials, token, genuine):
    project, _ = env.project()
    response = env.client.post("/jobs", json={"project": project, "limit": 1, "concurrency": 1}, headers=env.headers(credentials, token))
    if response.status_code != 202:
        return False
    jobs = env.app.extensions["llm_ner"]["services"].jobs
    assert wait_until(lambda: jobs.get(response.json["id"])["state"] != "running", 60), "the job to end"
    return True


def probe_jobs_delete(env, credentials, token, genuine):
    from backend.pipeline.jobs.records import JobSpec

    project, _ = env.project()
    jobs = env.app.extensions["llm_ner"]["services"].jobs
    job_id = jobs.create(JobSpec(project, "missing", None, 1, None), "v", 2)
    response = env.client.delete(f"/jobs/{job_id}", headers=env.headers(credentials, token))
    cancelled = response.status_code == 202 and jobs.cancel_requested(job_id)
    jobs.finish(job_id, "cancelled")
    return cancelled


PROBES = {
    "GET /": _status("/"), "GET /health": _status("/health"), "GET /metrics": _status("/metrics"),
    "POST /setup": probe_setup_same, trust.SETUP: probe_setup_new,
    "POST /predict": probe_predict, trust.PREDICT_CONFIG: probe_predict_config,
    "POST /webhook": probe_webhook, trust.ANNOTATION: probe_annotation, trust.DELETED: probe_deleted,
    trust.TRAINING: probe_training, trust.WARM_START: probe_warm_start,
    "GET /jobs": _status("/jobs"), "GET /jobs/<job_id>": probe_jobs_get,
    "POST /jobs": probe_jobs_post, "DELETE /jobs/<job_id>": probe_jobs_delete,
}


def _settings(mode: Mode, label_studio) -> dict[str, Any]:
    values: dict[str, Any] = dict(warm_start=True, start_training_interval=0)
    if mode in (Mode.AUTHENTICATED, Mode.BOTH):
        values.update(basic_auth_user=USER, basic_auth_pass=PASSWORD)
    if mode in (Mode.VERIFIED, Mode.BOTH):
        values.update(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    return values


CELLS = [
    pytest.param(row.action, mode, id=f"{row.action} | {mode.value}",
                 marks=[pytest.mark.label_studio] if mode in (Mode.VERIFIED, Mode.BOTH) else [])
    for row in trust.TABLE for mode in Mode
]


@pytest.mark.parametrize("action, mode", CELLS)
def test_every_cell_of_the_trust_table_holds(request, make_settings, llm, action, mode):
    from backend.protocol.server import create_app

    label_studio = request.getfixturevalue("label_studio") if mode in (Mode.VERIFIED, Mode.BOTH) else None
    app = create_app(make_settings(**_settings(mode, label_studio)))
    env = Env(mode, app.test_client(), app, llm, label_studio, label_studio.client() if label_studio else None)
    llm.gazetteer = {"Ada": "PER", "Oslo": "LOC"}
    cell = trust.ROWS[action].cells[mode]
    probe = PROBES[action]
    try:
        if Proof.REFUSED in cell.proofs:
            assert not probe(env, credentials=True, token=True, genuine=True), f"{action} happened in {mode.value} mode"
            return
        needed = {"credentials": Proof.CREDENTIALS in cell.proofs, "token": Proof.TOKEN in cell.proofs,
                  "genuine": Proof.LABEL_STUDIO in cell.proofs}
        assert probe(env, **needed), f"{action}: did not happen with {cell.text()!r}"
        for proof, key in ((Proof.CREDENTIALS, "credentials"), (Proof.TOKEN, "token"), (Proof.LABEL_STUDIO, "genuine")):
            if proof in cell.proofs:
                assert not probe(env, **{**needed, key: False}), f"{action}: happened without {proof.value} in {mode.value} mode"
    finally:
        for project_id in env.projects:
            env.ls.projects.delete(id=project_id)


def test_every_route_of_the_server_is_a_row_and_every_row_has_a_probe(app):
    routes = {f"{method} {rule.rule}" for rule in app.url_map.iter_rules() if rule.endpoint != "static"
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes == set(trust.ROUTES)
    assert set(PROBES) == set(trust.ROWS)
    assert set(trust.EVENTS.values()) == {row.action for row in trust.TABLE if row.action.startswith("POST /webhook: ")}


def test_the_docs_show_the_table_the_code_enforces():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "production.md").read_text(encoding="utf-8")
    table = trust.markdown()
    assert table in docs, "docs/production.md: paste `python -c 'from backend.protocol.trust import markdown; print(markdown())'`"
    for row in trust.TABLE:  # every cell, as it reads
        line = next(line for line in docs.splitlines() if line.startswith(f"| `{row.action}` |"))
        assert all(row.cells[m].text() in line for m in Mode), line
    assert re.search(r"tests/test_trust_table\.py", docs)
