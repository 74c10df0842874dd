"""The store engines side by side: the backend's own time per task of /predict on SQLite (MODEL_DIR)
and on PostgreSQL (DATABASE_URL), through the real backend (`llm-ner serve`, one gunicorn worker) over
HTTP against the fake LLM with latency 0. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_store_engines.py [requests]

Each engine answers `requests` /predict calls of one task each (as Label Studio sends them when an
annotator opens tasks), on a project with 20 stored corrections: first new texts (cache misses: a
cache write, drafts and usage per call), then the same texts again (cache hits). PostgreSQL is a
cluster of this run's own (Debian's binaries, as in the tests) with its default durability (fsync,
synchronous_commit on; the backend relaxes it for its bookkeeping writes only, see Database.transaction),
reached over TCP on 127.0.0.1. The engines take turns (SQLite, PostgreSQL, SQLite, PostgreSQL), so a
busy moment of a shared machine does not weigh on one of them only; each row pools both of its runs.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import NER_CONFIG, annotation_event, span  # noqa: E402
from tests.fake_llm import FakeLLM  # noqa: E402
from tests.processes import backend_env, run_backend, run_postgres  # noqa: E402

GAZETTEER = {"Ada Lovelace": "PER", "Charles Babbage": "PER", "London": "LOC"}


def text(i: int) -> str:
    return f"Task {i}: Ada Lovelace met Charles Babbage in London, where the engine number {i} was built."


def measure(fake: FakeLLM, requests: int, **env: str) -> dict[str, list[float]]:
    model_dir = Path(tempfile.mkdtemp(prefix="bench-store-"))
    log = Path(tempfile.mkstemp(prefix="bench-store-", suffix=".log")[1])
    environment = backend_env(fake.base_url, model_dir, LOG_LEVEL="WARNING", **env)
    times: dict[str, list[float]] = {"miss": [], "hit": []}
    with run_backend(environment, workers=1, log_path=log) as backend, httpx.Client(base_url=backend.url, timeout=60) as http:
        http.post("/setup", json={"project": "3", "schema": NER_CONFIG}).raise_for_status()
        for i in range(20):
            t = text(-i - 1)
            event = annotation_event("ANNOTATION_CREATED", i + 1, 10_000 + i, t, [span(t, "Ada Lovelace", "PER")], project=3)
            http.post("/webhook", json=event).raise_for_status()

        def one(i: int) -> float:
            body = {"tasks": [{"id": i, "data": {"text": text(i)}}], "project": "3.1", "label_config": NER_CONFIG}
            started = time.perf_counter()
            response = http.post("/predict", json=body)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            assert response.json()["results"][0]["result"], "an unanswered task"
            return elapsed * 1000

        for i in range(20):  # warm-up: the model object, prepared statements, the pool's connections
            one(100_000 + i)
        fake.requests.clear()
        times["miss"] = [one(i) for i in range(requests)]
        calls = len(fake.requests)
        times["hit"] = [one(i) for i in range(requests)]
        assert len(fake.requests) == calls == requests, "the hits were not all hits"
    return times


def main(requests: int = 300, turns: int = 2) -> None:
    fake = FakeLLM()
    fake.gazetteer = GAZETTEER
    results: dict[str, dict[str, list[float]]] = {e: {"miss": [], "hit": []} for e in ("SQLite", "PostgreSQL")}
    with run_postgres(durable=True) as pg:
        for turn in range(turns):
            pg.admin(f"CREATE DATABASE bench_{turn}")
            for engine, env in (("SQLite", {}), ("PostgreSQL", {"DATABASE_URL": pg.tcp_url(f"bench_{turn}")})):
                for kind, times in measure(fake, requests, **env).items():
                    results[engine][kind] += times
    fake.close()
    print(f"== /predict, one task per request, {turns} x {requests} requests per row; fake LLM latency 0; ms per task ==")
    print(f"{'engine':<36}{'miss median':>12}{'miss mean':>11}{'hit median':>12}{'hit mean':>10}")
    base = results["SQLite"]
    for engine, times in results.items():
        print(f"{engine:<36}{statistics.median(times['miss']):>12.2f}{statistics.mean(times['miss']):>11.2f}"
              f"{statistics.median(times['hit']):>12.2f}{statistics.mean(times['hit']):>10.2f}")
    for engine, times in results.items():
        if engine != "SQLite":
            ratios = [statistics.median(times[k]) / statistics.median(base[k]) for k in ("miss", "hit")]
            print(f"{engine} / SQLite (medians): misses {ratios[0]:.2f}x, hits {ratios[1]:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
