"""Four gunicorn workers share state: right after a change made through one worker, every worker serves
the same model_version, the same few-shot examples and the same response cache; on both store
engines (SQLite under MODEL_DIR, PostgreSQL)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import NER_CONFIG, region_tuples

WORKERS = 4
PROJECT = "21"
CONFIG_B = NER_CONFIG.replace('value="MISC"', 'value="EVENT"')


def fresh_call(url: str, body: dict) -> tuple[int, str]:
    """One request on a new connection (so any worker may take it): (worker pid, model_version)."""
    response = httpx.post(url, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return int(response.headers["X-Backend-Worker"]), response.json()["model_version"]


def versions_seen_by_every_worker(url: str, body: dict, timeout: float = 60) -> dict[int, set[str]]:
    """Ask many times in parallel until all WORKERS workers have answered at least once."""
    seen: dict[int, set[str]] = {}
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(16) as pool:
        while len(seen) < WORKERS and time.monotonic() < deadline:
            for pid, version in pool.map(lambda _: fresh_call(url, body), range(32)):
                seen.setdefault(pid, set()).add(version)
    assert len(seen) == WORKERS, f"only {len(seen)} workers answered: {sorted(seen)}"
    return seen


@pytest.fixture
def backend(backend_factory, llm, database_url):
    llm.gazetteer = {"Ada Lovelace": "PER", "London": "LOC"}
    return backend_factory(workers=WORKERS)


def setup_body(config: str) -> dict:
    return {"project": PROJECT, "schema": config}


def predict_body(text: str = "Ada Lovelace lived in London.") -> dict:
    # no label_config: each worker must read the project's current one from the shared store
    return {"tasks": [{"id": 1, "data": {"text": text}}], "project": f"{PROJECT}.1700000000"}


def test_every_worker_serves_the_new_model_version_right_after_a_label_config_change(backend):
    url = backend.url
    version_a = httpx.post(url + "/setup", json=setup_body(NER_CONFIG)).json()["model_version"]
    # every worker has built its model object for config A
    assert all(v == {version_a} for v in versions_seen_by_every_worker(url + "/setup", setup_body(NER_CONFIG)).values())

    version_b = httpx.post(url + "/setup", json=setup_body(CONFIG_B)).json()["model_version"]  # one worker
    assert version_b != version_a
    seen = versions_seen_by_every_worker(url + "/predict", predict_body())
    assert all(versions == {version_b} for versions in seen.values()), seen


def test_a_correction_received_by_one_worker_changes_every_workers_version_and_examples(backend, llm):
    url = backend.url
    before = httpx.post(url + "/setup", json=setup_body(NER_CONFIG)).json()["model_version"]
    versions_seen_by_every_worker(url + "/setup", setup_body(NER_CONFIG))  # warm every worker
    text = "Grace Hopper visited London."
    region = {"from_name": "label", "to_name": "text", "type": "labels",
              "value": {"start": 0, "end": 12, "text": "Grace Hopper", "labels": ["PER"]}}
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1, "task": 7, "result": [region]},
             "task": {"id": 7, "data": {"text": text}}, "project": {"id": int(PROJECT)}}
    assert httpx.post(url + "/webhook", json=event).status_code == 201

    seen = versions_seen_by_every_worker(url + "/setup", setup_body(NER_CONFIG))
    (after,) = set.union(*seen.values())
    assert after != before

    # and every worker shows the new example to the LLM
    llm.requests.clear()
    texts = [f"Ada Lovelace and Grace Hopper, case {i}." for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda t: fresh_call(url + "/predict", predict_body(t)), texts))
    assert len(llm.requests) == len(texts)
    assert all(any(text in m["content"] for m in r["messages"][1:-1]) for r in llm.requests)


def test_the_response_cache_is_shared_one_llm_call_for_a_text_whatever_worker_answers(backend, llm):
    url = backend.url
    httpx.post(url + "/setup", json=setup_body(NER_CONFIG))
    first = httpx.post(url + "/predict", json=predict_body()).json()
    assert len(llm.requests) == 1
    seen = versions_seen_by_every_worker(url + "/predict", predict_body())
    assert len(seen) == WORKERS
    assert len(llm.requests) == 1, "a worker asked the LLM again for a text another worker had answered"
    again = httpx.post(url + "/predict", json=predict_body()).json()
    spans = lambda answer: region_tuples(answer["results"][0]["result"], "start", "end", "label")
    assert spans(again) == spans(first) == [(0, 12, "PER"), (22, 28, "LOC")]
