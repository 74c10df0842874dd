"""Disk and store faults: a MODEL_DIR that fills up, a damaged store, the metric files, a PostgreSQL
that cannot be reached.

What is promised: a 503 naming the store (its file, or PostgreSQL's host and database, never a
password) and its state instead of a 500; /health reporting the store (DOWN when it cannot be used);
pre-labels still answered while the store cannot be written; what was acknowledged kept; no worker
crash loop; a start that stops with one line naming the store.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import NER_CONFIG, annotation_event, span
from tests.processes import REPO, backend_env


def stored_annotations(model_dir: Path, project: str = "1") -> list[int]:
    from backend.infra.storage import Database
    from backend.learning.store import ExampleStore

    return sorted(e.annotation_id for e in ExampleStore(Database.in_dir(model_dir), project).examples())


def test_a_store_that_cannot_grow_answers_503_naming_it_and_keeps_what_it_acknowledged(backend_factory, llm, tmp_path):
    model_dir = tmp_path / "model"
    backend = backend_factory(workers=1, model_dir=model_dir, max_file_bytes=2_000_000)
    http = httpx.Client(base_url=backend.url, timeout=30)
    assert http.post("/setup", json={"project": "1", "schema": NER_CONFIG}).status_code == 200
    assert http.get("/health").json()["store"]["state"] == "ok"

    acknowledged, refused = [], None
    for i in range(1, 60):
        text = f"Jordan number {i} " + "x" * 150_000
        event = annotation_event("ANNOTATION_CREATED", i, i, text, [span(text, "Jordan", "PER")], project=1)
        response = http.post("/webhook", json=event)
        assert response.status_code in (201, 503), response.text
        if response.status_code == 503:
            refused = response.json()
            break
        acknowledged.append(i)
    assert refused is not None, "the store never stopped growing"
    assert "backend.sqlite3" in refused["error"] and refused["store"] in ("full", "failing")
    assert "MODEL_DIR" in refused["error"]

    health = http.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "DOWN" and health.json()["store"]["state"] in ("full", "failing")

    # pre-labels need no write: still answered (their cache, drafts and usage wait for the disk)
    llm.gazetteer = {"Oslo": "LOC"}
    body = {"tasks": [{"id": 900, "data": {"text": "Oslo."}}], "project": "1.1", "label_config": NER_CONFIG}
    predicted = http.post("/predict", json=body)
    assert predicted.status_code == 200
    assert [r["value"]["text"] for r in predicted.json()["results"][0]["result"]] == ["Oslo"]

    log = backend.log()
    assert "Traceback" not in log and "unexpected error" not in log
    assert log.count("Booting worker") == 1  # no worker died
    assert len(acknowledged) >= 3
    assert stored_annotations(model_dir) == acknowledged  # every acknowledged correction is there


def test_the_metric_files_are_kept_out_of_model_dir(backend_factory, tmp_path):
    """prometheus_client memory-maps them: on a full MODEL_DIR a write to one killed its worker with
    SIGBUS, and the workers then booted and died in a loop."""
    model_dir = tmp_path / "model"
    backend = backend_factory(workers=1, model_dir=model_dir)
    worker = httpx.get(backend.url + "/health").headers["X-Backend-Worker"]
    # the files the worker has memory-mapped: its metric files among them
    fields = [line.split(None, 5) for line in Path(f"/proc/{worker}/maps").read_text().splitlines()]
    mapped = {Path(f[5]) for f in fields if len(f) == 6}
    metric_files = [p for p in mapped if p.suffix == ".db" and p.name.startswith(("counter_", "histogram_", "gauge_"))]
    assert metric_files, sorted(map(str, mapped))[:20]
    (metrics_dir,) = {p.parent for p in metric_files}
    assert model_dir.resolve() not in metrics_dir.resolve().parents
    assert not (model_dir / "prometheus").exists()
    from tests.processes import stop

    stop(backend.proc)
    assert not metrics_dir.exists()  # removed when the backend stops


def serve(model_dir: Path, llm) -> subprocess.CompletedProcess:
    env = backend_env(llm.base_url, model_dir)
    return subprocess.run([sys.executable, "-m", "backend", "serve", "--port", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_store_that_is_no_database_stops_the_start_with_one_line_naming_it(tmp_path, llm):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "backend.sqlite3").write_bytes(b"this is not a database, " * 200)
    done = serve(model_dir, llm)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"llm-ner: MODEL_DIR: the store {model_dir / 'backend.sqlite3'} is corrupt")
    assert "move it away" in line


def test_a_truncated_store_stops_the_start_with_one_line_naming_it(tmp_path, llm):
    from backend.infra.storage import Database
    from backend.learning.store import ExampleStore
    from backend.spans.alignment import Span

    model_dir = tmp_path / "model"
    store = ExampleStore(Database.in_dir(model_dir), "1")
    for i in range(1, 200):
        text = f"Ada number {i} " + "y" * 2000
        store.upsert_annotation(i, i, 1_700_000_000.0, {"label": (text, [Span(0, 3, "Ada", "PER")])})
    store.db.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    path = model_dir / "backend.sqlite3"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    done = serve(model_dir, llm)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"llm-ner: MODEL_DIR: the store {path} is corrupt")
    assert "Traceback" not in done.stderr


def test_a_store_damaged_under_a_running_backend_is_reported_by_health_and_answered_503(make_client, settings):
    client = make_client(setup_project="1")
    event = annotation_event("ANNOTATION_CREATED", 1, 1, "Ada wrote.", [], project=1)
    assert client.post("/webhook", json=event).status_code == 201
    path = settings.model_dir / "backend.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    # the schema's pages (page 1 and, once it outgrows it, its leaves) are kept: the store opens, its data is garbage
    schema = {row[0] for row in conn.execute("SELECT pageno FROM dbstat WHERE name='sqlite_schema'")}
    conn.close()
    pages = path.stat().st_size // page_size
    assert 1 in schema and len(schema) < pages
    with open(path, "r+b") as f:  # every other page overwritten
        for page in range(1, pages + 1):
            if page not in schema:
                f.seek((page - 1) * page_size)
                f.write(os.urandom(page_size))
    fresh = make_client()  # a worker that starts now (the first one's pages may sit in its cache)
    health = fresh.get("/health")
    assert health.status_code == 503 and health.json["store"]["state"] == "corrupt"
    response = fresh.post("/setup", json={"project": "2", "schema": NER_CONFIG})
    assert response.status_code == 503
    assert str(path) in response.json["error"] and response.json["store"] == "corrupt"


def test_sqlite_errors_are_told_apart_by_what_they_say_about_the_store(tmp_path):
    from backend.infra.storage import Database, StoreUnavailable, store_state

    db = Database.in_dir(tmp_path)  # made, then opened read-only, as a file without write permission would be
    readonly = sqlite3.connect(f"file:{db.path}?mode=ro", uri=True)
    with pytest.raises(sqlite3.Error) as refused:
        readonly.execute("INSERT INTO project_values VALUES ('1', 'k', '1')")
    assert store_state(refused.value) == "read-only"
    assert str(StoreUnavailable(db.path, refused.value)).startswith(f"the store {db.path} is read-only (")
    full = sqlite3.connect(db.path)
    full.execute("PRAGMA max_page_count = 1")  # as on a full disk: SQLITE_FULL
    with pytest.raises(sqlite3.Error) as no_room:
        full.execute("INSERT INTO project_values VALUES ('1', 'k', ?)", ("x" * 100_000,))
    assert store_state(no_room.value) == "full"


# ---- PostgreSQL (DATABASE_URL) ----
PASSWORD = "pg-secret-7f3a"  # in every URL below; the cluster trusts local users, so it is never checked


def with_password(url: str) -> str:
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


def test_an_unreachable_postgresql_stops_the_start_with_one_line_naming_host_and_database(tmp_path, llm, postgres):
    from tests.processes import free_port

    for url, reason in (
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/shared", "Connection refused"),
        (with_password(postgres.url("no_such_database")), 'database "no_such_database" does not exist'),
    ):
        env = backend_env(llm.base_url, tmp_path / "model", DATABASE_URL=url)
        done = subprocess.run([sys.executable, "-m", "backend", "serve", "--port", "1"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("llm-ner: DATABASE_URL: the store postgresql://postgres@"), line
        assert "is unreachable (" in line and reason in line and "DATABASE_URL's host, port, database" in line
        assert "/" + url.split("?")[0].rsplit("/", 1)[1] + " is unreachable" in line  # the database's name
        assert PASSWORD not in done.stderr + done.stdout


def test_postgresql_going_away_under_a_running_backend_is_reported_and_recovered(backend_factory, postgres, llm):
    from tests.processes import wait_until

    name = "going_away"
    postgres.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name} TEMPLATE llm_ner_template")
    url = with_password(postgres.url(name))
    backend = backend_factory(workers=1, DATABASE_URL=url)
    http = httpx.Client(base_url=backend.url, timeout=30)
    assert http.post("/setup", json={"project": "1", "schema": NER_CONFIG}).status_code == 200
    health = http.get("/health").json()
    assert health["store"] == {"state": "ok", "engine": "postgresql", "database": f"postgresql://postgres@{postgres.socket_dir}:{postgres.port}/{name}"}

    # the database disappears (as a server that went away would): connections fail with the server's words
    postgres.admin(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
        f"ALTER DATABASE {name} RENAME TO {name}_away",
    )
    try:
        event = annotation_event("ANNOTATION_CREATED", 1, 1, "Ada wrote.", [], project=1)
        refused = http.post("/webhook", json=event)
        assert refused.status_code == 503
        assert refused.json()["store"] == "unreachable" and f"/{name} is unreachable" in refused.json()["error"]
        down = wait_until(lambda: (r := http.get("/health")).status_code == 503 and r, timeout=15, interval=0.5)
        assert down and down.json()["store"]["state"] == "unreachable"
    finally:
        postgres.admin(f"ALTER DATABASE {name}_away RENAME TO {name}")
    # back: the next write succeeds, and /health says so once its few seconds of memory pass
    assert http.post("/webhook", json=event).status_code == 201
    assert wait_until(lambda: http.get("/health").status_code == 200, timeout=15, interval=0.5)
    log = backend.log()
    assert "Traceback" not in log and "unexpected error" not in log and PASSWORD not in log
    assert log.count("Booting worker") == 1
    postgres.admin(f"DROP DATABASE {name} WITH (FORCE)")


def test_postgresql_stopped_under_load_answers_the_pre_labels_already_paid_for(backend_factory, llm, tmp_path):
    """The server really stops (a cluster of the test's own) while /predict calls wait on the LLM: the
    answers they paid for go out (not a 503 after the pool's timeouts), the lost bookkeeping is logged
    and counted, and /health is UP again at the first write after the server is back."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tests.processes import run_postgres, wait_until

    with run_postgres() as own:
        own.admin("CREATE DATABASE stopped")
        # Label Studio credentials: pre-labels are claimed as delivered (a write) before they are answered
        backend = backend_factory(workers=1, DATABASE_URL=own.url("stopped"), PACK_SIZE="1")
        http = httpx.Client(base_url=backend.url, timeout=120)
        assert http.post("/setup", json={"project": "1", "schema": NER_CONFIG}).status_code == 200
        arrived, release = [], threading.Event()

        def held(body):  # the LLM call is made (and paid); its answer comes once the server is gone
            arrived.append(body)
            release.wait(120)
            return llm.gazetteer_reply(body)

        llm.gazetteer, llm.responder = {"Oslo": "LOC"}, held
        bodies = [{"tasks": [{"id": i, "data": {"text": f"Oslo, part {i}."}}], "project": "1.1", "label_config": NER_CONFIG}
                  for i in range(1, 7)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = [pool.submit(http.post, "/predict", json=body) for body in bodies]
            try:
                assert wait_until(lambda: len(arrived) == len(bodies), timeout=60)
                own.stop()
            finally:
                release.set()
            answers = [a.result() for a in answers]
        assert [a.status_code for a in answers] == [200] * len(bodies), [a.text for a in answers]
        assert all([r["value"]["text"] for r in a.json()["results"][0]["result"]] == ["Oslo"] for a in answers)
        lost = metric_in(http.get("/metrics").text, "llm_ner_store_writes_lost_total")
        # open mode (no Label Studio: verified mode would check /setup at one) writes no delivery claims
        assert lost.get("cache", 0) >= 1 and lost.get("drafts", 0) >= 1, lost
        log = backend.log()
        assert "LLM drafts not recorded" in log and "Traceback" not in log
        assert http.get("/health").status_code == 503

        own.start()
        changed = NER_CONFIG.replace('value="PER"', 'value="PERSON"')
        assert wait_until(lambda: http.post("/setup", json={"project": "1", "schema": changed}).status_code == 200,
                          timeout=60, interval=0.5)
        assert http.get("/health").status_code == 200  # at once: the write went through
        assert log.count("Booting worker") == 1


def metric_in(text: str, name: str) -> dict[str, float]:
    """{kind label: value} of a counter with one label, from /metrics text."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].split("} ")
            values[labels.split('"')[1]] = float(value)
    return values


def test_health_is_up_again_soon_after_a_full_disk_is_freed(backend_factory, llm, tmp_path):
    """Today's failure memory kept /health DOWN for a minute after the disk was freed; it is UP again at
    the first write that goes through, /health's own (a write large enough to prove the room)."""
    from backend.infra.storage import Database
    from tests.processes import wait_until

    model_dir = tmp_path / "model"
    store = Database.in_dir(model_dir)  # made and filled by the test (no size limit): room to give back later
    with store.transaction() as conn:
        conn.execute("INSERT INTO project_values(project_id, key, value) VALUES ('', 'filler', ?)", ("x" * 1_000_000,))
    store.close()
    backend = backend_factory(workers=1, model_dir=model_dir, max_file_bytes=2_000_000)
    http = httpx.Client(base_url=backend.url, timeout=30)
    assert http.post("/setup", json={"project": "1", "schema": NER_CONFIG}).status_code == 200
    for i in range(1, 60):
        text = f"Jordan number {i} " + "x" * 150_000
        event = annotation_event("ANNOTATION_CREATED", i, i, text, [span(text, "Jordan", "PER")], project=1)
        if http.post("/webhook", json=event).status_code == 503:
            break
    else:
        raise AssertionError("the store never stopped growing")
    assert http.get("/health").status_code == 503

    # the disk is freed: the filler goes (its pages are free for the backend's next writes)
    with sqlite3.connect(model_dir / "backend.sqlite3") as conn:
        conn.execute("DELETE FROM project_values WHERE key='filler'")
    with sqlite3.connect(model_dir / "backend.sqlite3") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    # no other traffic: /health's own write tells (it checks again every few seconds, not after a minute)
    assert wait_until(lambda: http.get("/health").status_code == 200, timeout=30, interval=0.5)
    assert http.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 500, 500, "Ada wrote.", [span("Ada wrote.", "Ada", "PER")],
                                                       project=1)).status_code == 201
    assert "Traceback" not in backend.log()
