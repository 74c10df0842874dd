"""/metrics of `llm-ner serve` (gunicorn, 2 workers): Prometheus text, summed over the workers."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import NER_CONFIG
from tests.fake_llm import Reply, entities_reply


def samples(backend) -> dict[tuple[str, tuple], float]:
    response = httpx.get(backend.url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def value(found, name, **labels):
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_llm_calls_tokens_errors_retries_cache_drops_and_examples(backend_factory, llm):
    backend = backend_factory(workers=2, LLM_RETRY_BASE="0.01")
    post = lambda path, body: httpx.post(backend.url + path, json=body, timeout=30)
    assert post("/setup", {"project": "3", "schema": NER_CONFIG}).status_code == 200
    llm.replies.extend([
        Reply(status=503),  # retried once
        entities_reply([("Oslo", "LOC"), ("Oslo", "CITY"), ("Bergen", "LOC")]),  # CITY: unknown label; Bergen: not in text
    ])
    tasks = [{"id": 1, "data": {"text": "Oslo is cold."}}]
    for _ in range(2):  # the second time from the cache
        assert post("/predict", {"tasks": tasks, "project": "3.1", "label_config": NER_CONFIG}).status_code == 200
    llm.replies.append(Reply(status=401, error_message="bad key"))
    assert post("/predict", {"tasks": [{"id": 2, "data": {"text": "Rome."}}], "project": "3.1", "label_config": NER_CONFIG}).status_code == 200
    annotation = {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 1, "task": 1, "was_cancelled": False, "ground_truth": False, "updated_at": "2025-01-01T00:00:00Z",
                       "result": [{"from_name": "label", "to_name": "text", "type": "labels",
                                   "value": {"start": 0, "end": 4, "text": "Oslo", "labels": ["LOC"]}}]},
        "task": {"id": 1, "data": {"text": "Oslo is cold."}},
        "project": {"id": 3, "label_config": NER_CONFIG},
    }
    assert post("/webhook", annotation).status_code == 201

    found = samples(backend)
    assert value(found, "llm_ner_requests_total", endpoint="/predict", status="200") == 3
    assert value(found, "llm_ner_request_seconds_count", endpoint="/predict") == 3
    assert value(found, "llm_ner_llm_calls_total", outcome="ok") == 1
    assert value(found, "llm_ner_llm_calls_total", outcome="auth") == 1
    assert value(found, "llm_ner_llm_errors_total", error_class="server") == 1
    assert value(found, "llm_ner_llm_errors_total", error_class="auth") == 1
    assert value(found, "llm_ner_llm_retries_total", error_class="server") == 1
    assert value(found, "llm_ner_llm_tokens_total", kind="prompt") > 0
    assert value(found, "llm_ner_project_tokens_total", project="3", kind="prompt") > 0
    assert value(found, "llm_ner_cache_total", result="hit") == 1
    assert value(found, "llm_ner_cache_total", result="miss") == 2
    # counted per prediction served: the cached answer drops them again
    assert value(found, "llm_ner_dropped_entities_total", reason="unknown_label") == 2
    assert value(found, "llm_ner_dropped_entities_total", reason="not_found") == 2
    assert value(found, "llm_ner_llm_call_seconds_count") == 3
    assert value(found, "llm_ner_examples", project="3") == 1
