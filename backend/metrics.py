"""Prometheus metrics, shared across gunicorn workers through prometheus_client's multiprocess mode.

`llm-ner serve` sets PROMETHEUS_MULTIPROC_DIR before the workers start; without it (tests, a single
process) the default registry is used.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import REGISTRY, multiprocess

REQUESTS = Counter("llm_ner_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"])
LATENCY = Histogram(
    "llm_ner_request_seconds", "HTTP request latency by endpoint", ["endpoint"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 90, 120),
)
LLM_CALLS = Counter("llm_ner_llm_calls_total", "LLM calls by outcome", ["outcome"])
LLM_TOKENS = Counter("llm_ner_llm_tokens_total", "LLM tokens by kind", ["kind"])
DROPPED = Counter("llm_ner_dropped_entities_total", "Entities from the LLM not emitted, by reason", ["reason"])
TASKS = Counter("llm_ner_predicted_tasks_total", "Tasks answered by /predict, by outcome", ["outcome"])


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
