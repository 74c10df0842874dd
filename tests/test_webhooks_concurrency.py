"""The example store under real load: 4 gunicorn workers, 200 concurrent webhooks, kill -9, restart;
on both store engines (SQLite under MODEL_DIR, PostgreSQL)."""

from __future__ import annotations

import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import NER_CONFIG, annotation_event, region_tuples, span
from tests.processes import stop

TASKS = 50
VERSIONS = 4  # ANNOTATION_CREATED then three ANNOTATION_UPDATED per task: 200 webhooks
LABELS = ("PER", "ORG", "LOC", "MISC")


def text_of(task: int) -> str:
    return f"Report {task}: Kim Lee visited Acme Corp in Springfield."


def version_result(task: int, version: int) -> list[dict]:
    """Each version labels a different set of spans, so the latest one is recognisable."""
    text = text_of(task)
    surfaces = ["Kim Lee", "Acme Corp", "Springfield"][: 1 + version % 3]
    return [span(text, s, LABELS[version]) for s in surfaces]


def expected_latest(task: int) -> list[tuple[str, str]]:
    return region_tuples(version_result(task, VERSIONS - 1), "text", "label")


def events() -> list[dict]:
    out = []
    for task in range(TASKS):
        for version in range(VERSIONS):
            action = "ANNOTATION_CREATED" if version == 0 else "ANNOTATION_UPDATED"
            updated_at = f"2025-03-01T10:00:{version:02d}.{task:06d}Z"
            out.append(annotation_event(action, 1000 + task, task + 1, text_of(task), version_result(task, version), updated_at=updated_at))
    random.Random(4).shuffle(out)  # arrival order is not version order
    return out


def store_of(model_dir, database_url):
    from backend.infra.storage import Database
    from backend.learning.store import ExampleStore

    return ExampleStore(Database.open(model_dir, database_url), "7")


def test_200_concurrent_webhooks_on_4_workers_survive_kill_9_with_every_latest_example_once(backend_factory, tmp_path, database_url):
    model_dir = tmp_path / "model"
    backend = backend_factory(workers=4, model_dir=model_dir)
    assert httpx.post(backend.url + "/setup", json={"project": "7", "schema": NER_CONFIG}).status_code == 200

    # one pooled client: a new httpx client per request costs the test more CPU than the backend spends
    http = httpx.Client(timeout=10, limits=httpx.Limits(max_connections=40))

    def send(event: dict) -> tuple[int, float]:
        started = time.perf_counter()
        response = http.post(backend.url + "/webhook", json=event)
        return response.status_code, time.perf_counter() - started

    with http, ThreadPoolExecutor(max_workers=40) as pool:
        answers = list(pool.map(send, events()))
    statuses = [status for status, _ in answers]
    assert statuses == [201] * TASKS * VERSIONS
    slowest = max(seconds for _, seconds in answers)
    # Label Studio gives up on a webhook after 1 s: met on a quiet machine (docs/benchmarks.md); under the
    # load of a shared CI machine, a bound it meets that still catches a webhook waiting on others
    assert slowest < 5.0, f"a webhook took {slowest:.2f} s"
    version_before = httpx.post(backend.url + "/setup", json={"project": "7", "schema": NER_CONFIG}).json()["model_version"]

    stop(backend.proc, signal.SIGKILL)  # no clean shutdown: what was acknowledged must be on disk
    restarted = backend_factory(workers=4, model_dir=model_dir)

    store = store_of(model_dir, database_url)
    rows = store.annotation_rows()
    assert sorted(rows) == sorted((1000 + t, "label", t + 1) for t in range(TASKS)), "a missing or duplicated example"
    examples = {e.task_id: e for e in store.examples()}
    assert sorted(examples) == list(range(1, TASKS + 1))
    for task in range(TASKS):
        assert [(s.text, s.label) for s in examples[task + 1].spans] == expected_latest(task)
    # the restarted workers agree with the ones that were killed: same example set, same version
    versions = {httpx.post(restarted.url + "/setup", json={"project": "7", "schema": NER_CONFIG}).json()["model_version"] for _ in range(8)}
    assert versions == {version_before}
