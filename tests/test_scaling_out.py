"""Scaling out on PostgreSQL (DATABASE_URL): versioned migrations (`llm-ner migrate`, replicas starting
at once), `llm-ner migrate-store` from SQLite, and two replicas with MODEL_DIRs of their own (as two
hosts would have) sharing one PostgreSQL: one model_version, one response cache, one model for Label
Studio whichever replica it talks to."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.conftest import NER_CONFIG, annotation_event, deleted_event, open_store, predict, region_tuples, span
from tests.processes import REPO, backend_env, wait_until

PASSWORD = "pg-secret-91c2"  # the cluster trusts local users: a password in the URL is never checked, only never shown
TABLES = ("projects", "project_values", "examples", "deleted_annotations", "drafts", "example_sets", "llm_cache",
          "llm_usage", "deliveries", "jobs", "job_failures")
TEXT = "Ada Lovelace lived in London."


def with_password(url: str) -> str:
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


def llm_ner(*args: str, **env: str) -> subprocess.Popen:
    environment = {k: v for k, v in backend_env("http://127.0.0.1:9/v1", REPO / "unused", **env).items() if k != "OPENAI_API_KEY"}
    return subprocess.Popen([sys.executable, "-m", "backend", *args], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def contents(db) -> dict[str, list[tuple]]:
    """Every row of every table, comparable across engines."""
    return {t: sorted(tuple(r) for r in db.query(f"SELECT * FROM {t}")) for t in TABLES}


# ---- migrations ----
def test_migrate_applies_each_schema_version_once_when_four_replicas_start_together(postgres, tmp_path):
    postgres.admin("DROP DATABASE IF EXISTS fresh_schema WITH (FORCE)", "CREATE DATABASE fresh_schema")  # empty: no schema
    url = with_password(postgres.url("fresh_schema"))
    runs = [finished(p) for p in [llm_ner("migrate", DATABASE_URL=url) for _ in range(4)]]
    from backend.infra.storage import MIGRATIONS, Database

    newest = len(MIGRATIONS)
    where = f"postgresql://postgres@{postgres.socket_dir}:{postgres.port}/fresh_schema"
    assert [r[0] for r in runs] == [0] * 4, runs
    assert {r[1] for r in runs} == {f"PostgreSQL store {where}: schema version {newest} (newest {newest})\n"}
    assert all(PASSWORD not in out + err for _, out, err in runs)
    db = Database(url=url)
    assert [r["version"] for r in db.query("SELECT version FROM schema_version ORDER BY version")] == list(range(1, newest + 1))
    assert db.version() == newest
    db.close()
    postgres.admin("DROP DATABASE fresh_schema WITH (FORCE)")

    code, out, _ = finished(llm_ner("migrate", MODEL_DIR=str(tmp_path / "model")))
    assert code == 0 and out == f"SQLite store {tmp_path / 'model' / 'backend.sqlite3'}: schema version {newest} (newest {newest})\n"


OPEN_AT_ONCE = """
import sys
from pathlib import Path
base, rounds, me = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
from backend.infra.storage import Database
for round_ in range(rounds):
    (base / f"ready-{round_}-{me}").touch()
    go = base / f"go-{round_}"
    while not go.exists():
        pass  # spin: the six must reach the file within microseconds of each other
    Database.in_dir(base / f"model-{round_}").close()
"""


def test_processes_opening_a_new_sqlite_store_at_once_all_start(tmp_path):
    """Several processes on one host (gunicorn workers, `llm-ner worker`s) creating MODEL_DIR's store
    together: SQLite lets one of them switch the new file to WAL and answers the others "database is
    locked" at once, without waiting; every one must open it all the same, in each of ten rounds. The same
    six processes take part in every round, each round in a new MODEL_DIR: sixty process starts (each
    importing the backend) cost far more than the race they set up."""
    rounds, opening = 10, range(6)
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, str(tmp_path), str(rounds), str(i)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in opening]
    ended = lambda: [p for p in procs if p.poll() is not None]
    try:
        for round_ in range(rounds):
            ready = [tmp_path / f"ready-{round_}-{i}" for i in opening]
            assert wait_until(lambda ready=ready: all(r.exists() for r in ready) or ended(), timeout=60), round_
            if ended():  # one failed to open the last round's store: the others wait for ever
                break
            (tmp_path / f"go-{round_}").touch()  # all six open the new file at the same moment
        else:
            for proc in procs:
                proc.wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    runs = [(p.returncode, p.stderr.read()) for p in procs]
    assert [code for code, _ in runs] == [0] * 6, [err for _, err in runs]
    assert all((tmp_path / f"model-{round_}").is_dir() for round_ in range(rounds))


# ---- migrate-store ----
def test_migrate_store_copies_a_sqlite_store_into_postgresql_and_a_second_run_changes_nothing(
    make_client, make_settings, llm, postgres_url, tmp_path
):
    from backend.infra.storage import Database
    from backend.pipeline.delivery import Deliveries
    from backend.pipeline.jobs.records import Jobs, JobSpec

    llm.gazetteer = {"Ada Lovelace": "PER", "London": "LOC"}
    # a store made by a backend on SQLite: label config, examples (one deleted), drafts, cache, usage...
    sqlite_app = make_client(setup_project="7")
    first = predict(sqlite_app, [TEXT], project="7.1")
    for i, text in enumerate(["Grace Hopper sailed.", "Alan Turing ran.", "Kim Lee sat."], start=1):
        event = annotation_event("ANNOTATION_CREATED", i, i, text, [span(text, text.split()[0] + " " + text.split()[1], "PER")])
        assert sqlite_app.post("/webhook", json=event).status_code == 201
    assert sqlite_app.post("/webhook", json=deleted_event(3)).status_code == 201
    after_corrections = predict(sqlite_app, [TEXT], project="7.1")
    source = open_store(make_settings())
    # ...deliveries and a project job with a failed task
    Deliveries(source).claim("7", after_corrections["model_version"], [1, 2])
    jobs = Jobs(source)
    job = jobs.create(JobSpec(7), after_corrections["model_version"], 2)
    jobs.fail_task(job, 2, "the LLM refused")
    jobs.finish(job, "done")
    before = contents(source)
    assert all(before[t] for t in TABLES), {t for t in TABLES if not before[t]}  # every table has something to copy

    url = with_password(postgres_url)
    code, out, err = finished(llm_ner("migrate-store", "--to", url, "--model-dir", str(tmp_path / "model")))
    assert code == 0, err
    assert PASSWORD not in out + err
    counts = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert counts["examples"][0] == "2" and counts["examples"][-1] == "2"  # the deleted one is not an example
    assert counts["deleted_annotations"][-1] == "1" and counts["llm_cache"][-1] == str(len(before["llm_cache"]))
    target = Database(url=url)
    assert contents(target) == before

    code, out, err = finished(llm_ner("migrate-store", "--to", url, "--model-dir", str(tmp_path / "model")))
    assert code == 0, err
    assert all(line.endswith(": 0") for line in out.splitlines()[1:]), out
    assert contents(target) == before

    # a backend on PostgreSQL now is the same model: same version, the cached answer, no LLM call
    llm.requests.clear()
    postgres_app = make_client(database_url=url)
    answer = predict(postgres_app, [TEXT], project="7.1")
    assert answer["model_version"] == after_corrections["model_version"] != first["model_version"]
    assert llm.requests == []
    target.close()


def test_migrate_store_into_a_postgresql_in_use_keeps_the_newest_annotation_and_every_deletion(postgres_url, tmp_path):
    from backend.infra.storage import Database
    from backend.learning.store import ExampleStore, fingerprint_of
    from backend.spans.alignment import Span

    def example(text: str, label: str) -> dict:
        return {"label": (text, [Span(0, 3, text[:3], label)])}

    sqlite = ExampleStore(Database.in_dir(tmp_path / "model"), "7")
    postgres = ExampleStore(Database(url=postgres_url), "7")
    sqlite.upsert_annotation(1, 10, 200.0, example("Ada wrote.", "PER"))  # newer here
    postgres.upsert_annotation(1, 10, 100.0, example("Ada wrote.", "ORG"))
    sqlite.upsert_annotation(2, 11, 100.0, example("Bob ran.", "PER"))
    postgres.upsert_annotation(2, 11, 300.0, example("Bob ran.", "LOC"))  # newer there
    postgres.upsert_annotation(3, 12, 100.0, example("Cyd sat.", "PER"))
    sqlite.delete_annotations([3])  # deleted where PostgreSQL did not hear of it
    sqlite.upsert_annotation(4, 13, 100.0, example("Dan hid.", "PER"))

    done = finished(llm_ner("migrate-store", "--to", postgres_url, "--model-dir", str(tmp_path / "model")))
    assert done[0] == 0, done[2]
    merged = {e.annotation_id: e.spans[0].label for e in postgres.examples()}
    assert merged == {1: "PER", 2: "LOC", 4: "PER"}
    digests = [r["digest"] for r in postgres.db.query("SELECT digest FROM examples WHERE project_id='7'")]
    assert postgres.fingerprint() == fingerprint_of(digests)  # the version describes the merged set
    # a late update of the deleted annotation cannot bring it back on PostgreSQL either
    assert postgres.upsert_annotation(3, 12, 900.0, example("Cyd sat.", "PER")) == "deleted"
    postgres.db.close()


def test_migrate_store_refuses_what_it_cannot_use_in_one_line(postgres, tmp_path):
    from tests.processes import free_port

    code, _, err = finished(llm_ner("migrate-store", "--to", postgres.url("postgres"), "--model-dir", str(tmp_path / "none")))
    assert code == 2 and err == f"llm-ner: --model-dir: no SQLite store at {tmp_path / 'none' / 'backend.sqlite3'}\n"
    from backend.infra.storage import Database

    Database.in_dir(tmp_path / "model")
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/shared"
    code, _, err = finished(llm_ner("migrate-store", "--to", url, "--model-dir", str(tmp_path / "model")))
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"llm-ner: the store postgresql://postgres@127.0.0.1:{url.split(':')[3].split('/')[0]}/shared is unreachable")
    assert PASSWORD not in err and "Traceback" not in err


# ---- two replicas ----
@pytest.fixture
def replicas(backend_factory, postgres_url, tmp_path, llm):
    """Two backends with MODEL_DIRs of their own (two hosts) on one PostgreSQL database."""
    llm.gazetteer = {"Ada Lovelace": "PER", "London": "LOC"}
    url = with_password(postgres_url)
    return [backend_factory(workers=1, model_dir=tmp_path / f"host-{i}", DATABASE_URL=url) for i in (1, 2)]


def test_two_replicas_answer_one_model_version_and_share_the_response_cache(replicas, llm):
    one, two = (httpx.Client(base_url=r.url, timeout=30) for r in replicas)

    def version(http) -> str:
        return http.post("/setup", json={"project": "7", "schema": NER_CONFIG}).json()["model_version"]

    before = version(one)
    assert version(two) == before
    # a correction sent to one replica: both answer the new version at once
    text = "Grace Hopper sailed."
    assert two.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 1, 1, text, [span(text, "Grace Hopper", "PER")])).status_code == 201
    after = version(one)
    assert after != before and version(two) == after

    # an answer one replica paid for is the other's too: no LLM call
    body = {"tasks": [{"id": 9, "data": {"text": TEXT}}], "project": "7.1", "label_config": NER_CONFIG}
    first = one.post("/predict", json=body).json()
    assert len(llm.requests) == 1
    second = two.post("/predict", json=body).json()
    assert len(llm.requests) == 1
    spans = lambda answer: region_tuples(answer["results"][0]["result"], "start", "end", "label")
    assert spans(second) == spans(first) == [(0, 12, "PER"), (22, 28, "LOC")]
    assert second["model_version"] == first["model_version"] == after
    # /health names the shared database (never its password) on both
    for http in (one, two):
        health = http.get("/health").json()
        assert health["store"]["state"] == "ok" and health["store"]["engine"] == "postgresql"
    for replica in replicas:
        assert PASSWORD not in replica.log() and "Traceback" not in replica.log()


@pytest.mark.label_studio
def test_label_studio_connected_to_one_replica_then_the_other_sees_one_model(connected_project, replicas, llm):
    llm.gazetteer = {"Jordan": "ORG", "Chicago Bulls": "ORG", "Pippen": "PER"}
    texts = ["Jordan signed with the Chicago Bulls in 1984.", "Pippen joined the Chicago Bulls in 1987.",
             "The Chicago Bulls won six titles."]
    one, two = replicas
    project = connected_project(texts, title="two replicas", backend=one)
    first = project.open_next_task()
    (draft,) = project.predictions(first["id"])
    text = first["data"]["text"]
    annotation = project.ls.annotations.create(id=first["id"], result=[span(text, "Jordan", "PER"), span(text, "Chicago Bulls", "ORG")])
    assert wait_until(lambda: project.model_version() != draft.model_version, 30), "replica one to learn the correction"
    learned = project.model_version()

    # the project moves to the other replica: it knows the correction, its version and the cached answers
    project.ls.ml.delete(id=project.ml.id)
    project.connect(two)
    assert project.model_version() == learned
    calls = len(llm.requests)
    second = project.open_next_task()
    (prediction,) = project.predictions(second["id"])
    assert prediction.model_version == learned
    (request,) = llm.requests[calls:]
    assert "Jordan" in request["messages"][1]["content"]  # the correction, shown as an example
    # and a deletion replica two hears of is replica one's too
    project.ls.annotations.delete(id=annotation.id)
    assert wait_until(lambda: project.model_version() == draft.model_version, 30), "replica two to forget the example"
    assert httpx.post(one.url + "/setup", json={"project": str(project.id), "schema": NER_CONFIG}, timeout=30).json()["model_version"] == draft.model_version


@pytest.mark.parametrize("pool", [2, 6])
def test_database_pool_bounds_the_postgresql_connections_of_a_process(postgres_url, tmp_path, monkeypatch, pool):
    """DATABASE_POOL is the most connections a process holds: six threads reading at once share two
    connections with DATABASE_POOL=2, and get six of their own with 6 (a barrier holds all six reads open)."""
    import threading

    from backend.infra.settings import load_settings
    from backend.infra.storage import Database

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    monkeypatch.setenv("DATABASE_POOL", str(pool))
    monkeypatch.chdir(tmp_path)
    db = Database.from_settings(load_settings())
    together = threading.Barrier(6, timeout=30) if pool >= 6 else None
    backends: list[int] = []

    def read() -> None:
        with db.reading() as conn:
            backends.append(conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"])
            if together is not None:
                together.wait()

    threads = [threading.Thread(target=read) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    db.close()
    assert len(backends) == 6  # every read was served
    if pool >= 6:
        assert len(set(backends)) == 6  # six reads open at once: six connections
    else:
        assert len(set(backends)) <= pool
