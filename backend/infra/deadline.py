"""Run one function over the tasks of a request with bounded concurrency and a deadline.

The answer always has one entry per input, in input order: a value, or the error that replaced it
(a `DeadlineExceeded` for what did not finish in time). The deadline travels with the work as a
ContextVar, so the LLM client below can cap its timeouts and skip retries that cannot finish in
time without being handed the deadline through every layer in between.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Generic, TypeVar

I = TypeVar("I")
O = TypeVar("O")


class DeadlineExceeded(Exception):
    pass


_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


def time_left() -> float | None:
    """Seconds left before the deadline of the work in this context; None = no deadline."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def _under_deadline(func: Callable[[I], O], deadline: float) -> Callable[[I], O]:
    def run(item: I) -> O:
        _deadline.set(deadline)  # in the item's own copy of the context: nothing to undo
        return func(item)

    return run


@dataclass
class Outcome(Generic[O]):
    value: O | None = None
    error: BaseException | None = None


def _inline(func: Callable[[I], O], item: I) -> Outcome[O]:
    try:
        return Outcome(value=func(item))
    except Exception as error:  # noqa: BLE001 - reported in the outcome, as a pooled call would be
        return Outcome(error=error)


def map_in_order(
    func: Callable[[I], O], items: Sequence[I], *, concurrency: int, deadline_seconds: float
) -> list[Outcome[O]]:
    if not items:
        return []
    started = time.monotonic()
    outer = time_left()  # nested under another request's deadline: never outlive it
    if outer is not None:
        deadline_seconds = min(deadline_seconds, max(0.0, outer))
        if len(items) == 1:
            # the outer map already abandons this thread at its deadline: a thread of our own
            # would only add its start-up time (milliseconds) to every task
            return [_inline(func, items[0])]
    run = _under_deadline(func, started + deadline_seconds)
    executor = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(items))), thread_name_prefix="predict")
    try:
        futures: list[Future[O]] = [executor.submit(contextvars.copy_context().run, run, item) for item in items]
        wait(futures, timeout=max(0.0, deadline_seconds - (time.monotonic() - started)))
        outcomes: list[Outcome[O]] = []
        for future in futures:
            if not future.done():
                future.cancel()
                outcomes.append(Outcome(error=DeadlineExceeded(f"not finished within {deadline_seconds:g} s")))
            elif future.exception() is not None:
                outcomes.append(Outcome(error=future.exception()))
            else:
                outcomes.append(Outcome(value=future.result()))
        return outcomes
    finally:
        # do not wait for calls still in flight: their answers are no longer wanted
        executor.shutdown(wait=False, cancel_futures=True)
