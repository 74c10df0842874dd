"""The provider call: chat completions through the openai client, against any compatible endpoint.

Before the first call the endpoint is probed once (probe.py): which structured-output form it
accepts, whether logprobs come back, whether `n` is honoured, how many requests it runs at once.
Structured output is asked for in the strongest form that works: `json_schema`, then `json_object`
with the schema (llama-cpp-python's form, which constrains decoding to it), then `json_object`, then
plain text parsed tolerantly; an error about the request's format, whatever its status code, steps
down to the next form. One repair turn shows the model its own validation error; an answer cut off
at `max_tokens` (finish_reason "length") is asked again without repeating it.

Retries are ours, not the openai client's (it runs with max_retries=0), so that we decide which
errors are worth another try, never sleep past the /predict deadline, and count every retry in
/metrics: 429 (honouring Retry-After), 5xx, timeouts, connection errors and unreadable bodies are
tried again with exponential backoff, full jitter and a cap; 400/401/403/404 fail at once. A
deterministic request (temperature 0) that timed out is sent again once, not more: it would take
as long again; to an endpoint that runs one call at a time it is not sent again at all, since such
a server (llama-cpp-python's) goes on generating the abandoned answer and the copy would wait
behind it. Calls wait for a slot of the ConcurrencyGate before their timeout starts.

Each answer (`ask_full`: its calls, their retries and the repair turn) has a time budget,
LLM_TASK_TIMEOUT (3 x LLM_TIMEOUT unless set), inside the request's deadline when there is one:
retries never multiply a slow answer's cost.

A prompt longer than the endpoint's context window is a 400 that names the window (OpenAI's, vLLM's
and llama-cpp-python's "maximum context length is N tokens", llama-server's "available context size
(N tokens)"): it is never sent again as it was. The client keeps the window (`context_tokens`, also
read from llama-server's /props by the probe) and the characters per prompt token it has seen, so
the text can be cut into chunks that fit (pipeline/prelabel.py); a prompt that fits with a smaller
max_tokens is sent again with that.
"""

from __future__ import annotations

import contextvars
import email.utils
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import openai
from openai import OpenAI

from backend.infra import deadline, metrics
from backend.infra.errors import LLMError, LLMOutputError
from backend.infra.masking import Secrets, shortened
from backend.infra.settings import Settings
from backend.infra.usage import Usage, record_usage
from backend.llm.capabilities import Capabilities, ProbeFailed
from backend.llm.ratelimit import ConcurrencyGate, GateTimeout, RateLimited, RateLimiter, SharedRateLimiter
from backend.llm.transport import call_deadline, http_client

log = logging.getLogger(__name__)
T = TypeVar("T")

# the structured-output forms, strongest first; json_object_schema is {"type": "json_object", "schema": ...}
MODES = ("json_schema", "json_object_schema", "json_object", "text")
# words in a 400/422 that mean "this endpoint does not do that response_format"
_FORMAT_HINTS = ("response_format", "json_schema", "json_object", "schema", "format", "support")
# the same in a 5xx must be specific: llama-cpp-python answers json_schema with a 500 naming the field
_FORMAT_HINTS_5XX = ("response_format", "json_schema", "json_object")
# the answer of a text cannot need more than this many tokens per character of the text (every word an
# entity: `{"text": "Oslo", "label": "LOC"}, ` is ~12 tokens for 5 characters), plus the JSON around it
ANSWER_TOKENS_PER_CHAR = 2
ANSWER_TOKENS_BASE = 64
# calls in flight without a probe and without PREDICT_CONCURRENCY
DEFAULT_CONCURRENCY = 8
# an answer slower than this share of LLM_TIMEOUT waited behind other requests: fewer in flight
SLOW_SHARE = 0.5
# after a probe that could not reach the endpoint, the next try waits this long
PROBE_RETRY_SECONDS = 60.0
# a Retry-After longer than this is a quota that ran out, not a hiccup: fail instead of waiting
MAX_RETRY_AFTER = 60.0
# the fewest tokens worth asking for an answer: below, the prompt must shrink instead
MIN_ANSWER_TOKENS = 64
# characters per prompt token are measured on prompts at least this long (a short one is mostly the
# chat template's own tokens)
MEASURED_PROMPT_CHARS = 1000
# a context-length 400, in the words of OpenAI, vLLM and llama-cpp-python ("maximum context length is
# N tokens ... (P in the messages, C in the completion)"), llama-cpp-python's own ("Requested tokens
# (P) exceed context window of N") and llama.cpp's llama-server ("request (P tokens) exceeds the
# available context size (N tokens)", with n_ctx and n_prompt_tokens in the error object)
_WINDOW_WORDS = (
    re.compile(r"maximum context length is (\d+)"),
    re.compile(r"context window of (\d+)"),
    re.compile(r"available context size \((\d+) tokens"),
)
_PROMPT_WORDS = (
    re.compile(r"\((\d+) in the messages"),
    re.compile(r"requested tokens \((\d+)\)", re.IGNORECASE),
    re.compile(r"request \((\d+) tokens\)"),
)
_CONTEXT_HINTS = ("context length", "context window", "context size", "context_length_exceeded", "exceed_context_size")


@dataclass
class Choice:
    content: str | None
    logprobs: list[tuple[str, float]] | None = None  # (token, logprob) over the content, when returned
    finish_reason: str | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class Completion:
    content: str | None
    usage: Usage
    mode: str
    choices: list[Choice] = field(default_factory=list)
    max_tokens: int = 0


@dataclass
class Answer(Generic[T]):
    """What `ask_full` got: the parsed samples (the first is the main answer) and the completion."""

    values: list[T]
    completion: Completion
    usage: Usage

    @property
    def value(self) -> T:
        return self.values[0]


class LLMCallFailed(LLMError):
    """One LLM call failed for good; `error_class` is the label used in /metrics."""

    def __init__(self, message: str, error_class: str, api_message: str = "", parameter: str | None = None):
        super().__init__(message)
        self.error_class = error_class
        self.api_message = api_message
        self.parameter = parameter  # "logprobs" / "n" / "response_format": the request parameter the endpoint refused


class ContextTooLong(LLMCallFailed):
    """The prompt does not fit in the endpoint's context window (a 400 that says so)."""

    def __init__(self, message: str, window: int | None, prompt_tokens: int | None, prompt_chars: int):
        super().__init__(message, "context_length")
        self.window = window  # tokens, when the endpoint named them
        self.prompt_tokens = prompt_tokens
        self.prompt_chars = prompt_chars


def context_limit(error: BaseException) -> tuple[int | None, int | None] | None:
    """(context window, prompt tokens) named by a 400 that says the prompt is too long (either may be
    None when its words do not say); None for any other error."""
    if not isinstance(error, openai.APIStatusError) or error.status_code not in (400, 413, 422):
        return None
    message = getattr(error, "message", "") or ""
    body = error.body if isinstance(error.body, dict) else {}
    error_type = f"{body.get('type', '')} {body.get('code', '')}"
    if not any(hint in f"{message.lower()} {error_type}" for hint in _CONTEXT_HINTS):
        return None

    def number(patterns: tuple[re.Pattern[str], ...], field: str) -> int | None:
        if isinstance(body.get(field), int):
            return body[field]
        for pattern in patterns:
            found = pattern.search(message)
            if found:
                return int(found.group(1))
        return None

    return number(_WINDOW_WORDS, "n_ctx"), number(_PROMPT_WORDS, "n_prompt_tokens")


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    return sum(len(str(m.get("content") or "")) for m in messages)


# until the endpoint's usage measured it: English text is ~4 characters a token, other scripts fewer
CHARS_PER_TOKEN = 3.0


def text_chars_for(window: int, other_tokens: float, chars_per_token: float | None) -> int:
    """Characters of task text one call may carry in a context window of `window` tokens when the rest
    of its prompt (instructions, examples) takes `other_tokens`: half of what is left, its answer the
    other half (an entity's JSON takes more tokens than its text), less a tenth for the estimate's error."""
    return int((window - other_tokens) / 2 * (chars_per_token or CHARS_PER_TOKEN) * 0.9)


def describe_api_error(error: Exception) -> str:
    """A log-safe description: status and class, and the server's words only where they hold no key."""
    if isinstance(error, openai.AuthenticationError):
        # OpenAI echoes part of the key in 401 messages: never repeat them
        return "authentication failed (HTTP 401): check OPENAI_API_KEY"
    if isinstance(error, openai.PermissionDeniedError):
        return "permission denied (HTTP 403): the key may not use this model"
    if isinstance(error, openai.NotFoundError):
        return "not found (HTTP 404): check LLM_MODEL and OPENAI_BASE_URL"
    if isinstance(error, openai.APIStatusError):
        message = getattr(error, "message", "") or ""
        return f"HTTP {error.status_code} from the LLM endpoint: {shortened(message, 300)}"
    if isinstance(error, openai.APITimeoutError):
        return "the LLM endpoint timed out"
    if isinstance(error, openai.APIConnectionError):
        return "could not connect to the LLM endpoint (check OPENAI_BASE_URL)"
    if isinstance(error, (ValueError, openai.APIResponseValidationError)):
        return "the LLM endpoint sent a body that is not a readable completion (truncated JSON?)"
    return f"{type(error).__name__}: {error}"


def retry_after_seconds(headers: Any) -> float | None:
    """Retry-After as seconds: `retry-after-ms`, `retry-after` in seconds, or an HTTP date."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(0.0, email.utils.mktime_tz(parsed) - time.time())
            continue
        if math.isnan(seconds):
            continue  # "nan" parses as a float: no delay at all, so four retries at once; use the backoff
        return max(0.0, seconds)  # "inf" stays inf: beyond MAX_RETRY_AFTER, the call fails without waiting
    return None


def response_format(mode: str, json_schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `response_format` of one structured-output form (None: plain text)."""
    if mode == "json_schema" and json_schema is not None:
        return {"type": "json_schema", "json_schema": json_schema}
    if mode == "json_object_schema" and json_schema is not None:
        return {"type": "json_object", "schema": json_schema["schema"]}
    if mode in ("json_object", "json_schema", "json_object_schema"):
        return {"type": "json_object"}
    return None


def unsupported_parameter(error: BaseException, body: dict[str, Any]) -> str | None:
    """"logprobs", "n" or "response_format" when the error says the endpoint does not take that part
    of the request, whatever the status code (llama-cpp-python answers json_schema with a 500)."""
    if not isinstance(error, openai.APIStatusError) or error.status_code in (401, 403, 404, 408, 409, 429):
        return None
    message = (getattr(error, "message", "") or "").lower()
    if body.get("logprobs") and "logprob" in message:
        return "logprobs"
    # llama-server: "Only one completion choice is allowed"
    if body.get("n", 1) > 1 and ("choice" in message or re.search(r"\bn\b", message)):
        return "n"
    hints = _FORMAT_HINTS if error.status_code < 500 else _FORMAT_HINTS_5XX
    if body.get("response_format") and any(hint in message for hint in hints):
        return "response_format"
    return None


def classify(error: BaseException) -> tuple[str, bool, float | None]:
    """(error class for /metrics, worth retrying?, server-asked delay in seconds)."""
    if isinstance(error, openai.APITimeoutError):
        return "timeout", True, None
    if isinstance(error, openai.APIConnectionError):
        return "connection", True, None
    if isinstance(error, openai.RateLimitError):
        return "rate_limit", True, retry_after_seconds(error.response.headers)
    if isinstance(error, openai.InternalServerError) or (
        isinstance(error, openai.APIStatusError) and error.status_code >= 500
    ):
        return "server", True, retry_after_seconds(error.response.headers)
    if isinstance(error, openai.AuthenticationError):
        return "auth", False, None
    if isinstance(error, openai.PermissionDeniedError):
        return "permission", False, None
    if isinstance(error, openai.NotFoundError):
        return "not_found", False, None
    if isinstance(error, (openai.BadRequestError, openai.UnprocessableEntityError)):
        return "bad_request", False, None
    if isinstance(error, openai.APIStatusError):
        return f"http_{error.status_code}", error.status_code in (408, 409), retry_after_seconds(error.response.headers)
    if isinstance(error, (ValueError, openai.APIResponseValidationError)):
        return "bad_response", True, None  # a body cut off mid-way: the next try usually arrives whole
    return "other", False, None


@dataclass
class _Budget:
    """An answer's time (LLM_TASK_TIMEOUT), counted from when its first call got a slot of the gate."""

    seconds: float
    started: float | None = None


# the budget of the answer asked in this context (`ask_full`): its retries and repair turn share it
_answer_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("answer_budget", default=None)


def _time_left() -> float | None:
    """Seconds left to this call: the request's deadline, or its answer's budget if that ends first."""
    left = deadline.time_left()
    budget = _answer_budget.get()
    if budget is None or budget.started is None:
        return left
    spent = budget.seconds - (time.monotonic() - budget.started)
    return spent if left is None else min(left, spent)


class LLMClient:
    def __init__(self, settings: Settings, client: OpenAI | None = None, sleep: Callable[[float], None] = time.sleep,
                 prober: Callable[[LLMClient], Capabilities] | None = None):
        self.settings = settings
        # what probes the endpoint before the first call (probe.probe_for); without, no probe
        self.prober = prober
        self.secrets = Secrets.from_settings(settings)
        # one client per process (see services.py), so this remembers per process what the endpoint accepts
        self._working_mode: str | None = None
        self._logprobs_ok = settings.llm_logprobs
        self._n_ok: bool | None = None  # None: not known yet
        self._lock = threading.Lock()
        self._sleep = sleep
        self.model = settings.llm_model
        self.max_tokens = settings.llm_max_tokens
        self.limiter: RateLimiter | SharedRateLimiter = RateLimiter(settings.llm_rpm, settings.llm_tpm)
        if settings.redis_url is not None and (settings.llm_rpm or settings.llm_tpm):
            # one budget for every worker and host: the provider's limit, not a share of it
            self.limiter = SharedRateLimiter(settings.redis_url.get_secret_value(), f"{settings.openai_base_url}\0{settings.llm_model}",
                                             settings.llm_rpm, settings.llm_tpm)
        # with a probe to come, one call at a time until it has measured more: a local server that
        # runs one (llama-cpp-python's) sent 8 at once times them all out
        first = DEFAULT_CONCURRENCY if not settings.llm_probe or prober is None else 1
        self.gate = ConcurrencyGate(settings.predict_concurrency or first, on_change=_log_concurrency)
        self.task_seconds = settings.llm_task_timeout or 3 * settings.llm_timeout
        # the endpoint's context window in tokens (the probe's /props, or a 400 that named it), and the
        # fewest characters per prompt token seen in its answers' usage: what sizes the chunks of a text
        self.context_tokens: int | None = None
        self.chars_per_token: float | None = None
        metrics.LLM_CONCURRENCY.set(self.gate.limit)
        self.capabilities: Capabilities | None = None
        self._probe_lock = threading.Lock()
        self._probed = not settings.llm_probe or prober is None
        self._probe_failed_at: float | None = None
        self.client = client or OpenAI(
            api_key=settings.openai_api_key.get_secret_value(),
            base_url=settings.openai_base_url,
            timeout=settings.llm_timeout,
            max_retries=0,  # see the module docstring: retries are decided in `_create`
            http_client=http_client(settings.llm_timeout),  # LLM_TIMEOUT bounds a whole call, not each read
        )

    @property
    def concurrency(self) -> int:
        """The most calls this process lets in flight (PREDICT_CONCURRENCY, or the probe's figure)."""
        self.prepare()
        return self.gate.ceiling

    def answer_tokens(self, text_chars: int) -> int:
        """max_tokens for the answer about `text_chars` characters of text: a runaway answer stops there."""
        return min(self.max_tokens, ANSWER_TOKENS_BASE + ANSWER_TOKENS_PER_CHAR * text_chars)

    # ---- the probe ----
    def prepare(self) -> Capabilities | None:
        """Probe the endpoint once per process (LLM_PROBE), and use what it found. Callers that wait for
        another thread's probe wait no longer than their deadline, then go on with the defaults."""
        if self._probed:
            return self.capabilities
        left = deadline.time_left()
        # another thread's probe may wait long for a slow server's first answer: keep half of the
        # time for the work itself (one call at a time meanwhile: the gate starts at 1)
        if not self._probe_lock.acquire(timeout=-1 if left is None else max(0.0, left / 2)):
            return None
        try:
            if self._probed:
                return self.capabilities
            if self._probe_failed_at is not None and time.monotonic() - self._probe_failed_at < PROBE_RETRY_SECONDS:
                return None
            try:
                capabilities = self.prober(self)  # type: ignore[misc]  # set: _probed is True without one
            except ProbeFailed as error:
                self._probe_failed_at = time.monotonic()
                one = self.settings.predict_concurrency is None
                log.warning(
                    "could not probe the LLM endpoint (%s); %s until it answers", error,
                    "one LLM call at a time (PREDICT_CONCURRENCY sets it)" if one else "using the defaults",
                )
                if one:
                    self.gate.reset(1)
                    metrics.LLM_CONCURRENCY.set(1)
                return None
            self.use(capabilities)
            self._probed = True
            return capabilities
        finally:
            self._probe_lock.release()

    def use(self, capabilities: Capabilities) -> None:
        """Adopt what a probe found, where the settings leave the choice to it."""
        settings = self.settings
        with self._lock:
            self.capabilities = capabilities
            if settings.llm_structured_output == "auto" and capabilities.mode is not None:
                self._working_mode = capabilities.mode
            if settings.llm_logprobs and capabilities.logprobs is not None:
                self._logprobs_ok = capabilities.logprobs
            if capabilities.n is not None:
                self._n_ok = capabilities.n
        if capabilities.context_tokens:
            self.learn_context(capabilities.context_tokens)
        if settings.predict_concurrency is None and capabilities.concurrency is not None:
            self.gate.reset(capabilities.concurrency)
            metrics.LLM_CONCURRENCY.set(self.gate.limit)

    def learn_context(self, window: int | None = None, chars: int = 0, tokens: int | None = None) -> None:
        """Keep the endpoint's context window, and `chars` characters of prompt taking `tokens` tokens."""
        with self._lock:
            if window:
                self.context_tokens = window
            if tokens and chars >= MEASURED_PROMPT_CHARS:
                ratio = chars / tokens
                self.chars_per_token = ratio if self.chars_per_token is None else min(self.chars_per_token, ratio)

    def _first_mode(self) -> str:
        if self.settings.llm_structured_output != "auto":
            return self.settings.llm_structured_output
        with self._lock:
            return self._working_mode or MODES[0]

    @property
    def mode(self) -> str:
        """The structured-output form the next call will use."""
        return self._first_mode()

    def _remember(self, mode: str) -> None:
        if self.settings.llm_structured_output == "auto":
            with self._lock:
                self._working_mode = mode

    def _scrub(self, message: str) -> str:
        # servers echo keys in error messages (and a base URL's userinfo): never pass them on
        return self.secrets.mask(message)

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^attempt)], so retrying workers spread out."""
        return random.uniform(0, min(self.settings.llm_retry_cap, self.settings.llm_retry_base * 2**attempt))

    def _create(self, kwargs: dict[str, Any]) -> Any:
        """One chat completion, tried again where that can help, never past the request's deadline."""
        chars = prompt_chars(kwargs["messages"])
        estimate = chars // 4
        deterministic = not kwargs.get("temperature") and kwargs.get("n", 1) == 1
        attempt = timeouts = 0
        while True:
            left = _time_left()
            if left is not None and left <= 0.05:
                raise LLMCallFailed(self._no_time_left(), "deadline")
            if deadline.cancelled():
                raise LLMCallFailed("cancelled: the job was", "cancelled")
            try:
                slot = self.gate.acquire(left)
            except GateTimeout as error:
                raise LLMCallFailed(f"no LLM call slot before the deadline: {error}", "deadline") from None
            budget = _answer_budget.get()
            if budget is not None and budget.started is None:
                budget.started = time.monotonic()  # waiting for the first slot is not the answer's time
            congested = False
            try:
                if deadline.cancelled():  # cancelled while it waited for the slot: the slot goes to others
                    raise LLMCallFailed("cancelled: the job was", "cancelled")
                # waiting for the slot took time: the HTTP timeout is counted from now
                left = _time_left()
                if left is not None and left <= 0.05:
                    raise LLMCallFailed(self._no_time_left(), "deadline")
                try:
                    handle = self.limiter.acquire(estimate + kwargs["max_tokens"] // 4, left)
                except RateLimited as error:
                    metrics.LLM_ERRORS.labels("local_rate_limit").inc()
                    raise LLMCallFailed(str(error), "local_rate_limit") from None
                timeout = self.settings.llm_timeout if left is None else max(0.05, min(self.settings.llm_timeout, left))
                started = time.perf_counter()
                try:
                    # The client's documented low-level call (same auth and errors as
                    # chat.completions.create) skips create()'s recursive re-typing of the messages,
                    # which for a prompt with long examples cost more than the rest of a task's work.
                    # cast_to=dict: we read four fields, and building the typed ChatCompletion is not free.
                    # A timeout closes the connection, so a server that stops on disconnect stops generating
                    # (llama-cpp-python drops a queued request whose client left). The timeout bounds the
                    # whole call, a provider trickling its answer included (llm/transport.py).
                    with call_deadline(timeout):
                        response = self.client.post(
                            "/chat/completions", body=kwargs, cast_to=dict, options={"timeout": timeout}
                        )
                    if not isinstance(response, dict):
                        raise ValueError("the completion body is not a JSON object")
                except Exception as error:
                    elapsed = time.perf_counter() - started
                    metrics.LLM_SECONDS.observe(elapsed)
                    if deadline.cancelled():  # the call was abandoned (llm/transport.py): never retried
                        raise LLMCallFailed("cancelled: the job was; its call abandoned", "cancelled") from None
                    error_class, retryable, delay = classify(error)
                    if error_class == "other":
                        raise
                    limit = context_limit(error)
                    if limit is not None:
                        window, prompt_tokens = limit
                        self.learn_context(window, chars, prompt_tokens)
                        metrics.LLM_ERRORS.labels("context_length").inc()
                        metrics.LLM_CALLS.labels("context_length").inc()
                        raise ContextTooLong(self._scrub(describe_api_error(error)), window, prompt_tokens, chars) from None
                    # a timeout the deadline cut short says nothing about the endpoint's load
                    congested = (error_class == "timeout" and timeout >= self.settings.llm_timeout) or (
                        error_class == "rate_limit" or getattr(error, "status_code", None) == 503
                    )
                    parameter = unsupported_parameter(error, kwargs)
                    if parameter is not None:
                        error_class, retryable = "unsupported", False
                    metrics.LLM_ERRORS.labels(error_class).inc()
                    message = self._scrub(describe_api_error(error))
                    api_message = (getattr(error, "message", "") or "") if error_class in ("bad_request", "unsupported") else ""
                    if error_class == "timeout":
                        timeouts += 1
                    if deterministic and timeouts >= 2:
                        metrics.LLM_CALLS.labels(error_class).inc()
                        log.warning("LLM call failed: it timed out twice after %g s; the same request would take as long again", timeout)
                        raise LLMCallFailed(f"timed out twice ({timeout:g} s each)", error_class) from None
                    if error_class == "timeout" and self.gate.ceiling == 1:
                        metrics.LLM_CALLS.labels(error_class).inc()
                        log.warning(
                            "LLM call failed: it timed out after %g s, and is not sent again: an endpoint that runs one"
                            " call at a time goes on generating the abandoned answer, so the copy would wait behind it", timeout,
                        )
                        raise LLMCallFailed(f"timed out after {timeout:g} s", error_class) from None
                    if not retryable or attempt >= self.settings.llm_max_retries:
                        metrics.LLM_CALLS.labels(error_class).inc()
                        why = "not retried" if not retryable else f"after {attempt} retries"
                        level = logging.INFO if parameter is not None else logging.WARNING  # a fallback follows
                        log.log(level, "LLM call failed (%s, %s): %s", error_class, why, message)
                        raise LLMCallFailed(message, error_class, api_message, parameter) from None
                    if delay is not None and delay > MAX_RETRY_AFTER:
                        metrics.LLM_CALLS.labels(error_class).inc()
                        log.warning("LLM call failed (%s): the endpoint asks to wait %.0f s; not waiting", error_class, delay)
                        raise LLMCallFailed(message, error_class) from None
                    delay = self.backoff(attempt) if delay is None else delay
                    left = _time_left()
                    if left is not None and delay >= left:
                        metrics.LLM_CALLS.labels(error_class).inc()
                        log.warning("LLM call failed (%s) and no time is left to retry: %s", error_class, message)
                        raise LLMCallFailed(message, error_class) from None
                    metrics.LLM_RETRIES.labels(error_class).inc()
                    log.info("LLM call failed (%s: %s); retry %d in %.2f s", error_class, message, attempt + 1, delay)
                else:
                    elapsed = time.perf_counter() - started
                    metrics.LLM_SECONDS.observe(elapsed)
                    metrics.LLM_CALLS_OK.inc()
                    # an answer this slow waited on the server behind other requests of ours
                    congested = elapsed > SLOW_SHARE * self.settings.llm_timeout
                    usage = _usage_of(response)
                    total = usage.prompt_tokens + usage.completion_tokens if response.get("usage") else estimate
                    self.learn_context(chars=chars, tokens=usage.prompt_tokens)
                    self.limiter.settle(handle, total)
                    metrics.PROMPT_TOKENS.inc(usage.prompt_tokens)
                    metrics.COMPLETION_TOKENS.inc(usage.completion_tokens)
                    record_usage(usage)  # the request's meter (usage.metering): failed tasks' calls count too
                    return response
            finally:
                self.gate.release(slot, congested)
            deadline.pause(delay, self._sleep)
            attempt += 1

    def _no_time_left(self) -> str:
        return f"no time was left for the LLM call (LLM_TASK_TIMEOUT={self.task_seconds:g} s an answer, or the request's deadline)"

    def _fitting_answer(self, messages: list[dict[str, str]], max_tokens: int) -> int:
        """max_tokens, within what the context window leaves after the prompt (when both are known)."""
        with self._lock:
            window, ratio = self.context_tokens, self.chars_per_token
        if window is None or ratio is None:
            return max_tokens
        room = window - int(prompt_chars(messages) / ratio * 1.1)
        return max(min(MIN_ANSWER_TOKENS, max_tokens), min(max_tokens, room))

    def _request(self, messages: list[dict[str, str]], mode: str, json_schema: dict[str, Any] | None, n: int,
                 temperature: float, max_tokens: int, logprobs: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        if n > 1:
            kwargs["n"] = n
        if logprobs:
            # llama-cpp-python returns no logprobs without top_logprobs; 0 is valid for OpenAI too
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = 0
        fmt = response_format(mode, json_schema)
        if fmt is not None:
            kwargs["response_format"] = fmt
        return kwargs

    def complete(
        self,
        messages: list[dict[str, str]],
        json_schema: dict[str, Any] | None = None,
        *,
        n: int = 1,
        temperature: float = 0.0,
        max_tokens: int | None = None,
    ) -> Completion:
        """`n` answers to the messages (asked one request each where the endpoint ignores `n`)."""
        self.prepare()
        max_tokens = self.max_tokens if max_tokens is None else max(1, min(max_tokens, self.max_tokens))
        with self._lock:
            n_ok = self._n_ok
        if n > 1 and n_ok is False:
            completions = [self._complete_once(messages, json_schema, 1, temperature, max_tokens) for _ in range(n)]
            return _merged(completions)
        try:
            completion = self._complete_once(messages, json_schema, n, temperature, max_tokens)
        except LLMCallFailed as error:
            if n > 1 and error.parameter == "n":
                self._n_unsupported(f"it refuses n={n}")
                return _merged([self._complete_once(messages, json_schema, 1, temperature, max_tokens) for _ in range(n)])
            raise
        if n > 1 and len(completion.choices) < n:
            self._n_unsupported(f"asked for {n} answers, it gave {len(completion.choices)}")
            extra = [self._complete_once(messages, json_schema, 1, temperature, max_tokens) for _ in range(n - len(completion.choices))]
            return _merged([completion, *extra])
        return completion

    def _n_unsupported(self, why: str) -> None:
        with self._lock:
            warn, self._n_ok = self._n_ok is not False, False
        if warn:
            log.warning("the LLM endpoint does not honour n (%s): LLM_SAMPLES answers are asked one request each", why)

    def _complete_once(
        self, messages: list[dict[str, str]], json_schema: dict[str, Any] | None, n: int, temperature: float, max_tokens: int
    ) -> Completion:
        mode = self._first_mode()
        max_tokens = self._fitting_answer(messages, max_tokens)
        while True:
            with self._lock:
                want_logprobs = self._logprobs_ok
            kwargs = self._request(messages, mode, json_schema, n, temperature, max_tokens, want_logprobs)
            try:
                response = self._create(kwargs)
            except ContextTooLong as error:
                window, prompt = error.window, error.prompt_tokens
                if window and prompt and prompt + MIN_ANSWER_TOKENS <= window < prompt + max_tokens:
                    # the prompt fits; the answer it may have does not (OpenAI and vLLM count max_tokens)
                    log.info("the LLM endpoint's context window is %d tokens: asking again with max_tokens=%d", window, window - prompt)
                    max_tokens = window - prompt
                    continue
                raise
            except LLMCallFailed as error:
                if error.error_class not in ("bad_request", "unsupported"):
                    raise
                message = error.api_message.lower()
                if want_logprobs and (error.parameter == "logprobs" or "logprob" in message):
                    log.info("LLM endpoint rejected logprobs; asking without them (spans get no logprob score)")
                    with self._lock:
                        self._logprobs_ok = False
                    continue
                can_fall_back = (
                    self.settings.llm_structured_output == "auto"
                    and mode != "text"
                    and (error.parameter == "response_format" or any(hint in message for hint in _FORMAT_HINTS))
                )
                if not can_fall_back:
                    raise
                next_mode = MODES[MODES.index(mode) + 1]
                log.info("LLM endpoint rejected response_format %s; falling back to %s", mode, next_mode)
                mode = next_mode
                continue
            self._remember(mode)
            usage = _usage_of(response)
            raw_choices = response.get("choices")
            if not isinstance(raw_choices, list) or not raw_choices:
                raise LLMOutputError("the LLM endpoint returned no choices")
            choices = [Choice(_content_of(c), _token_logprobs(c), _finish_reason(c)) for c in raw_choices]
            return Completion(choices[0].content, usage, mode, choices=choices, max_tokens=max_tokens)

    def ask_full(
        self,
        messages: list[dict[str, str]],
        parse: Callable[[str | None], T],
        repair_prompt: Callable[[str], str],
        json_schema: dict[str, Any] | None = None,
        *,
        samples: int = 1,
        temperature: float = 0.0,
        max_tokens: int | None = None,
    ) -> Answer[T]:
        """Ask (for `samples` answers), parse; when no answer parses, ask once more showing the model its
        error, or, for an answer cut off at max_tokens, asking again without it. All of it within the
        answer's time budget (LLM_TASK_TIMEOUT)."""
        token = _answer_budget.set(_Budget(self.task_seconds))
        try:
            return self._ask_full(messages, parse, repair_prompt, json_schema, samples, temperature, max_tokens)
        finally:
            _answer_budget.reset(token)

    def _ask_full(
        self,
        messages: list[dict[str, str]],
        parse: Callable[[str | None], T],
        repair_prompt: Callable[[str], str],
        json_schema: dict[str, Any] | None,
        samples: int,
        temperature: float,
        max_tokens: int | None,
    ) -> Answer[T]:
        usage = Usage()
        completion = self.complete(messages, json_schema, n=samples, temperature=temperature, max_tokens=max_tokens)
        usage.add(completion.usage)
        values: list[T] = []
        first_error: LLMOutputError | None = None
        truncated = False
        for choice in completion.choices:
            try:
                values.append(parse(choice.content))
            except LLMOutputError as invalid:
                error = invalid
                if choice.truncated:
                    truncated = True
                    error = LLMOutputError(_truncated(completion.max_tokens))
                first_error = first_error or error
        # one answer: it must parse; several samples: those that parse are enough
        if values and (first_error is None or samples > 1):
            return Answer(values, completion, usage)
        if truncated:
            metrics.LLM_TRUNCATED.inc()
            # the cut-off answer is not shown again: a model that ran away would only continue it
            log.info("LLM answer truncated at max_tokens=%d (finish_reason length); asking once more", completion.max_tokens)
            repaired = [*messages, {"role": "user", "content": repair_prompt(TRUNCATED_NOTE)}]
        else:
            log.info("LLM answer invalid (%s); asking once more", first_error)
            repaired = [
                *messages,
                {"role": "assistant", "content": completion.content or ""},
                {"role": "user", "content": repair_prompt(str(first_error))},
            ]
        completion = self.complete(repaired, json_schema, max_tokens=max_tokens)
        usage.add(completion.usage)
        try:
            value = parse(completion.content)
        except LLMOutputError:
            if completion.choices and completion.choices[0].truncated:
                metrics.LLM_TRUNCATED.inc()
                raise LLMOutputError(_truncated(completion.max_tokens) + ", again after asking once more") from None
            raise
        return Answer([value], completion, usage)


TRUNCATED_NOTE = (
    "your previous answer went on until it was cut off, without finishing the JSON. "
    "List each entity once, and stop after the last one"
)


def _truncated(max_tokens: int) -> str:
    return f"the answer was truncated at max_tokens={max_tokens} (finish_reason length) before its JSON ended"


def _merged(completions: list[Completion]) -> Completion:
    usage = Usage()
    for completion in completions:
        usage.add(completion.usage)
    choices = [choice for completion in completions for choice in completion.choices]
    first = completions[0]
    return Completion(first.content, usage, first.mode, choices=choices, max_tokens=first.max_tokens)


def _log_concurrency(limit: int, change: str) -> None:
    metrics.LLM_CONCURRENCY.set(limit)
    why = "the endpoint timed out, throttled or answered slowly" if change == "lowered" else "calls went well"
    log.info("LLM calls in flight %s to %d (%s)", change, limit, why)


# more tokens than any one call has: a `usage` beyond it is the endpoint's mistake (it once overflowed
# SQLite's integers and lost a whole /predict)
MAX_TOKENS_PER_CALL = 100_000_000


def _usage_of(response: dict[str, Any]) -> Usage:
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return Usage(calls=1)

    def count(key: str) -> int:
        value = usage.get(key)
        if type(value) is not int or not 0 <= value <= MAX_TOKENS_PER_CALL:
            return 0
        return value

    return Usage(prompt_tokens=count("prompt_tokens"), completion_tokens=count("completion_tokens"), calls=1)


def _content_of(choice: Any) -> str | None:
    """The answer text of one choice; anything else (content parts, null) is no text."""
    message = choice.get("message") if isinstance(choice, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else None


def _finish_reason(choice: Any) -> str | None:
    reason = choice.get("finish_reason") if isinstance(choice, dict) else None
    return reason if isinstance(reason, str) else None


def _token_logprobs(choice: Any) -> list[tuple[str, float]] | None:
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content:
        return None
    return [
        (item["token"], float(item["logprob"]))
        for item in content
        if isinstance(item, dict) and isinstance(item.get("token"), str) and isinstance(item.get("logprob"), (int, float))
    ]
