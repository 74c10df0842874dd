"""Warm start (WARM_START=true): on TASKS_CREATED, predict the new tasks in the background.

The predictions land in the response cache under the current model_version, so when Label Studio
later asks for them (a task opened, "Retrieve predictions") they come back with no LLM wait. The
webhook is answered at once (Label Studio waits 1 s); one warm-start batch runs at a time per worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

BATCH = 50  # tasks per background predict: each batch gets its own deadline


def precompute(model: Any, tasks: Sequence[dict[str, Any]], one_at_a_time: threading.Lock) -> int:
    """Predict (and so cache) these tasks; returns how many got a non-empty prediction."""
    labeled = 0
    with one_at_a_time:
        for start in range(0, len(tasks), BATCH):
            batch = list(tasks[start : start + BATCH])
            try:
                response = model.predict(batch, cache_only=True)
            except Exception:
                log.exception("warm start: predicting %d tasks failed", len(batch))
                continue
            labeled += sum(1 for p in response.predictions if p is not None and p.result)
    log.info("warm start: %d new tasks pre-computed (%d with entities)", len(tasks), labeled)
    return labeled


def start(model: Any, tasks: Sequence[dict[str, Any]], one_at_a_time: threading.Lock) -> threading.Thread | None:
    """Pre-compute these tasks (read from Label Studio, or from an authenticated TASKS_CREATED) in the background."""
    if not tasks:
        log.info("warm start: TASKS_CREATED without task data; nothing to pre-compute")
        return None
    thread = threading.Thread(target=precompute, args=(model, list(tasks), one_at_a_time), name="warm-start", daemon=True)
    thread.start()
    return thread
