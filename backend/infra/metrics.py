"""Prometheus metrics, shared across gunicorn workers through prometheus_client's multiprocess mode.

`llm-ner serve` sets PROMETHEUS_MULTIPROC_DIR before the workers start; without it (tests, a single
process) the default registry is used.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter("llm_ner_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"])
LATENCY = Histogram(
    "llm_ner_request_seconds", "HTTP request latency by endpoint", ["endpoint"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 90, 120),
)
LLM_CALLS = Counter("llm_ner_llm_calls_total", "LLM calls by outcome", ["outcome"])
LLM_TOKENS = Counter("llm_ner_llm_tokens_total", "LLM tokens by kind", ["kind"])
DROPPED = Counter("llm_ner_dropped_entities_total", "Entities from the LLM not emitted, by reason", ["reason"])
LLM_SECONDS = Histogram(
    "llm_ner_llm_call_seconds", "Latency of one LLM HTTP call (each try)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
)
LLM_ERRORS = Counter("llm_ner_llm_errors_total", "Failed LLM tries by error class", ["error_class"])
LLM_RETRIES = Counter("llm_ner_llm_retries_total", "LLM calls tried again, by the error class that caused it", ["error_class"])
CACHE = Counter("llm_ner_cache_total", "Response cache lookups by result (hit/miss)", ["result"])
PROJECT_TOKENS = Counter("llm_ner_project_tokens_total", "LLM tokens by project and kind", ["project", "kind"])
PROJECT_COST = Counter("llm_ner_project_cost_usd_total", "Estimated LLM cost in USD by project (LLM_PRICES)", ["project"])
PACKED_TASKS = Counter("llm_ner_packed_texts_total", "Texts answered through a packed LLM call", ["outcome"])
EXAMPLES = Gauge(
    "llm_ner_examples", "Few-shot examples stored per project", ["project"], multiprocess_mode="mostrecent"
)
ENTITY_TEXTS = Counter(
    "llm_ner_entity_text_schemas_total",
    "Texts asked with entity texts constrained to their spans (spans), or not: too many candidates, or an endpoint that takes no schema (free)",
    ["schema"],
)
LLM_TRUNCATED = Counter("llm_ner_llm_truncated_total", "LLM answers cut off at max_tokens (finish_reason length)")
LLM_CONCURRENCY = Gauge(
    "llm_ner_llm_concurrency", "LLM calls a worker lets in flight at once (adapts to the endpoint)",
    multiprocess_mode="livesum",
)
TASKS = Counter("llm_ner_predicted_tasks_total", "Tasks answered by /predict, by outcome", ["outcome"])
DELIVERED = Counter(
    "llm_ner_delivered_predictions_total", "Predictions written into Label Studio by the backend, by source", ["source"]
)
DELIVERY_FAILURES = Counter("llm_ner_delivery_failures_total", "Predictions that could not be written into Label Studio")
BACKLOG = Gauge(
    "llm_ner_backlog_tasks", "Tasks still being pre-labeled after their /predict's deadline", multiprocess_mode="livesum"
)
JOB_TASKS = Counter("llm_ner_job_tasks_total", "Tasks handled by project jobs, by outcome", ["outcome"])
STORE_WRITES_LOST = Counter(
    "llm_ner_store_writes_lost_total",
    "Bookkeeping writes lost because the store could not be written (the pre-labels were answered all the same), by kind",
    ["kind"],
)
UNANSWERED = Counter(
    "llm_ner_unanswered_tasks_total",
    "Tasks /predict answered with no prediction (Label Studio asks again later), by reason",
    ["reason"],
)

# label sets used for every task, looked up once (`labels()` takes a lock and builds a key each call)
LLM_CALLS_OK = LLM_CALLS.labels("ok")
PROMPT_TOKENS, COMPLETION_TOKENS = LLM_TOKENS.labels("prompt"), LLM_TOKENS.labels("completion")
CACHE_HITS, CACHE_MISSES = CACHE.labels("hit"), CACHE.labels("miss")


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
