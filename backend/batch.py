"""Run one function over the tasks of a request with bounded concurrency and a deadline.

The answer always has one entry per input, in input order: a value, or the error that replaced it
(a `DeadlineExceeded` for what did not finish in time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Generic, TypeVar

I = TypeVar("I")
O = TypeVar("O")


class DeadlineExceeded(Exception):
    pass


@dataclass
class Outcome(Generic[O]):
    value: O | None = None
    error: BaseException | None = None


def map_in_order(
    func: Callable[[I], O], items: Sequence[I], *, concurrency: int, deadline_seconds: float
) -> list[Outcome[O]]:
    if not items:
        return []
    started = time.monotonic()
    executor = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(items))), thread_name_prefix="predict")
    try:
        futures: list[Future[O]] = [executor.submit(func, item) for item in items]
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
