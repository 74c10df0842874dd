"""Run one function over the tasks of a request with bounded concurrency and a deadline.

The answer always has one entry per input, in input order: a value, or the error that replaced it
(a `DeadlineExceeded` for what did not finish in time). The deadline travels with the work as a
ContextVar, so the LLM client below can cap its timeouts and skip retries that cannot finish in
time without being handed the deadline through every layer in between.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

I = TypeVar("I")
O = TypeVar("O")


class DeadlineExceeded(Exception):
    pass


_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)
# set when the work in this context is no longer wanted (its job was cancelled): the LLM client starts
# no call and no retry, and abandons the call it is reading within CANCEL_LOOK seconds
_cancel: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("cancel", default=None)
CANCEL_LOOK = 0.5  # seconds between two looks at the cancel flag while a call's answer is awaited


@contextmanager
def cancellable(event: threading.Event) -> Iterator[None]:
    """The work in this block (and what it hands to map_in_order) stops once `event` is set."""
    token = _cancel.set(event)
    try:
        yield
    finally:
        _cancel.reset(token)


def cancelled() -> bool:
    event = _cancel.get()
    return event is not None and event.is_set()


def watching_cancel() -> bool:
    return _cancel.get() is not None


def pause(seconds: float, sleep: Callable[[float], None] = time.sleep) -> None:
    """Sleep, cut short by a cancel of the work in this context."""
    event = _cancel.get()
    if event is None:
        sleep(seconds)
    else:
        event.wait(seconds)


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
    except Exception as error:
        return Outcome(error=error)


def _outcome(future: Future[O]) -> Outcome[O]:
    if future.cancelled():
        return Outcome(error=DeadlineExceeded("cancelled"))
    if future.exception() is not None:
        return Outcome(error=future.exception())
    return Outcome(value=future.result())


def map_in_order(
    func: Callable[[I], O],
    items: Sequence[I],
    *,
    concurrency: int,
    deadline_seconds: float,
    keep_late: Callable[[int], Callable[[Outcome[O]], None] | None] | None = None,
) -> list[Outcome[O]]:
    """`func` over `items`, `concurrency` at a time; what is not done at the deadline is reported as
    DeadlineExceeded. Without `keep_late`, work still running then is abandoned (its thread finishes
    its current call) and work not started is cancelled. With it, the items run free of the deadline
    and `keep_late(i)` is asked for each late item: a callback keeps it running in the background and
    gets its outcome when it ends; None cancels it (what has not started never starts)."""
    if not items:
        return []
    started = time.monotonic()
    outer = time_left()  # nested under another request's deadline: never outlive it
    if outer is not None and keep_late is None:
        deadline_seconds = min(deadline_seconds, max(0.0, outer))
        if len(items) == 1:
            # the outer map already abandons this thread at its deadline: a thread of our own
            # would only add its start-up time (milliseconds) to every task
            return [_inline(func, items[0])]
    # kept work must not be cut by the request's deadline: it runs on, without one
    run = func if keep_late is not None else _under_deadline(func, started + deadline_seconds)
    executor = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(items))), thread_name_prefix="predict")
    try:
        futures: list[Future[O]] = [executor.submit(contextvars.copy_context().run, run, item) for item in items]
        wait(futures, timeout=max(0.0, deadline_seconds - (time.monotonic() - started)))
        outcomes: list[Outcome[O]] = []
        for i, future in enumerate(futures):
            if future.done():
                outcomes.append(_outcome(future))
                continue
            on_end = keep_late(i) if keep_late is not None else None
            if on_end is None:
                future.cancel()
            else:
                future.add_done_callback(lambda f, on_end=on_end: on_end(_outcome(f)))
            outcomes.append(Outcome(error=DeadlineExceeded(f"not finished within {deadline_seconds:g} s")))
        return outcomes
    finally:
        # never wait for work in flight; without keep_late, what has not started is no longer wanted
        # (with it, the cancelled futures above never start and the kept ones run on)
        executor.shutdown(wait=False, cancel_futures=keep_late is None)
