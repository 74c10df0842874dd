"""Usage and cost: tokens per call from the API's `usage`, totals per project, and an optional
price table (LLM_PRICES) for cost. The figures before anything is sent are `tools/estimate.py`."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.infra import metrics
from backend.infra.storage import STORE_ERRORS, Database

log = logging.getLogger(__name__)

PER_MILLION = 1_000_000


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.calls += other.calls


class Meter:
    """Usage of every LLM call made for one piece of work (a /predict), whichever thread made it and
    whether or not its task succeeded: `metering()` installs one, the LLM client records into it."""

    def __init__(self) -> None:
        self.usage = Usage()
        self._lock = threading.Lock()

    def add(self, usage: Usage) -> None:
        with self._lock:
            self.usage.add(usage)

    def take(self) -> Usage:
        """What was recorded since the last take (calls of work kept past the request come later)."""
        with self._lock:
            taken, self.usage = self.usage, Usage()
        return taken


# a ContextVar: map_in_order copies the context into each pooled task, so the tasks share the meter
_meter: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("usage_meter", default=None)


@contextlib.contextmanager
def metering() -> Iterator[Meter]:
    meter = Meter()
    token = _meter.set(meter)
    try:
        yield meter
    finally:
        _meter.reset(token)


def record_usage(usage: Usage) -> None:
    """Count one LLM call's usage in the current meter, if any."""
    meter = _meter.get()
    if meter is not None:
        meter.add(usage)


def price_of(prices: dict[str, tuple[float, float]] | None, model: str) -> tuple[float, float] | None:
    """USD per 1M (prompt, completion) tokens: an exact entry, else the longest entry the model name starts with."""
    if not prices:
        return None
    if model in prices:
        return prices[model]
    matches = [name for name in prices if model.startswith(name)]
    return prices[max(matches, key=len)] if matches else None


def cost_usd(usage: Usage, price: tuple[float, float] | None) -> float | None:
    if price is None:
        return None
    return (usage.prompt_tokens * price[0] + usage.completion_tokens * price[1]) / PER_MILLION


class UsageLedger:
    def __init__(self, db: Database):
        self.db = db

    @classmethod
    def in_dir(cls, model_dir: Path) -> UsageLedger:
        """A ledger on its own connection to MODEL_DIR's store (tools and tests; the server's is in Services)."""
        return cls(Database.in_dir(model_dir))

    def add(self, project_id: str, usage: Usage, tasks: int, cost: float | None) -> None:
        with self.db.transaction(durable=False) as conn:
            conn.execute(
                "INSERT INTO llm_usage(project_id, tasks, calls, prompt_tokens, completion_tokens, cost_usd) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(project_id) DO UPDATE SET tasks=llm_usage.tasks+excluded.tasks, "
                "calls=llm_usage.calls+excluded.calls, prompt_tokens=llm_usage.prompt_tokens+excluded.prompt_tokens, "
                "completion_tokens=llm_usage.completion_tokens+excluded.completion_tokens, "
                "cost_usd=llm_usage.cost_usd+excluded.cost_usd",
                (project_id, tasks, usage.calls, usage.prompt_tokens, usage.completion_tokens, cost or 0.0),
            )

    def totals(self, project_id: str) -> dict[str, Any]:
        rows = self.db.query("SELECT * FROM llm_usage WHERE project_id=?", (project_id,))
        if not rows:
            return {"project_id": project_id, "tasks": 0, "calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
        return dict(rows[0])

    def account(self, project_id: str, tasks: int, total: Usage, price: tuple[float, float] | None) -> None:
        """Add one /predict's usage (every call it made, see Meter) to the project's totals, /metrics and
        the log (with cost per task)."""
        cost = cost_usd(total, price)
        try:
            self.add(project_id, total, tasks, cost)
        except STORE_ERRORS as error:
            # bookkeeping: a store that cannot be written (a full disk) must not lose the paid-for answers
            metrics.STORE_WRITES_LOST.labels("usage").inc()
            log.warning("project %s: usage not recorded: %s", project_id, error)
        metrics.PROJECT_TOKENS.labels(project_id, "prompt").inc(total.prompt_tokens)
        metrics.PROJECT_TOKENS.labels(project_id, "completion").inc(total.completion_tokens)
        if cost is not None:
            metrics.PROJECT_COST.labels(project_id).inc(cost)
        per_task = f", ${cost:.6f} (${cost / max(1, tasks):.6f} per task)" if cost is not None else ""
        log.info(
            "project %s: %d tasks, %d LLM calls, %d prompt + %d completion tokens%s",
            project_id, tasks, total.calls, total.prompt_tokens, total.completion_tokens, per_task,
        )
