"""The provider call: chat completions through the openai client, against any compatible endpoint.

Structured output is asked for in the strongest form the endpoint accepts: `json_schema`, then
`json_object`, then plain text parsed tolerantly. The mode that worked is remembered per process.
One repair turn shows the model its own validation error.

Retries are ours, not the openai client's (it runs with max_retries=0), so that we decide which
errors are worth another try, never sleep past the /predict deadline, and count every retry in
/metrics: 429 (honouring Retry-After), 5xx, timeouts, connection errors and unreadable bodies are
tried again with exponential backoff, full jitter and a cap; 400/401/403/404 fail at once.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import openai
from openai import OpenAI

from backend.infra import deadline, metrics
from backend.infra.errors import LLMError, LLMOutputError
from backend.infra.settings import Settings
from backend.infra.usage import Usage
from backend.llm.ratelimit import RateLimited, RateLimiter

log = logging.getLogger(__name__)
T = TypeVar("T")

MODES = ("json_schema", "json_object", "text")
# words in a 400/422 that mean "this endpoint does not do that response_format"
_FORMAT_HINTS = ("response_format", "json_schema", "json_object", "schema", "format", "support")
# a Retry-After longer than this is a quota that ran out, not a hiccup: fail instead of waiting
MAX_RETRY_AFTER = 60.0


@dataclass
class Choice:
    content: str | None
    logprobs: list[tuple[str, float]] | None = None  # (token, logprob) over the content, when returned


@dataclass
class Completion:
    content: str | None
    usage: Usage
    mode: str
    choices: list[Choice] = field(default_factory=list)


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

    def __init__(self, message: str, error_class: str, api_message: str = ""):
        super().__init__(message)
        self.error_class = error_class
        self.api_message = api_message


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
        return f"HTTP {error.status_code} from the LLM endpoint: {message[:300]}"
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
            return max(0.0, float(value) / divisor)
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(0.0, email.utils.mktime_tz(parsed) - time.time())
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


class LLMClient:
    def __init__(self, settings: Settings, client: OpenAI | None = None, sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        # one client per process (see services.py), so this remembers per process what the endpoint accepts
        self._working_mode: str | None = None
        self._logprobs_ok = settings.llm_logprobs
        self._lock = threading.Lock()
        self._sleep = sleep
        self.model = settings.llm_model
        self.max_tokens = settings.llm_max_tokens
        self.limiter = RateLimiter(settings.llm_rpm, settings.llm_tpm)
        self.client = client or OpenAI(
            api_key=settings.openai_api_key.get_secret_value(),
            base_url=settings.openai_base_url,
            timeout=settings.llm_timeout,
            max_retries=0,  # see the module docstring: retries are decided in `_create`
        )

    def _first_mode(self) -> str:
        if self.settings.llm_structured_output != "auto":
            return self.settings.llm_structured_output
        with self._lock:
            return self._working_mode or MODES[0]

    def _remember(self, mode: str) -> None:
        if self.settings.llm_structured_output == "auto":
            with self._lock:
                self._working_mode = mode

    def _scrub(self, message: str) -> str:
        # servers echo keys, or their first characters, in error messages: never pass them on
        key = self.settings.openai_api_key.get_secret_value()
        for secret in (key, key[:8]):
            if len(secret) >= 6:
                message = message.replace(secret, "***")
        return message

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^attempt)], so retrying workers spread out."""
        return random.uniform(0, min(self.settings.llm_retry_cap, self.settings.llm_retry_base * 2**attempt))

    def _create(self, kwargs: dict[str, Any]) -> Any:
        """One chat completion, tried again where that can help, never past the request's deadline."""
        estimate = sum(len(str(m.get("content") or "")) for m in kwargs["messages"]) // 4
        attempt = 0
        while True:
            left = deadline.time_left()
            if left is not None and left <= 0.05:
                raise LLMCallFailed("the request's deadline passed before the LLM answered", "deadline")
            try:
                handle = self.limiter.acquire(estimate + self.max_tokens // 4, left)
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
                response = self.client.post(
                    "/chat/completions", body=kwargs, cast_to=dict, options={"timeout": timeout}
                )
                if not isinstance(response, dict):
                    raise ValueError("the completion body is not a JSON object")
            except Exception as error:  # noqa: BLE001 - classified below; unknown errors are re-raised
                metrics.LLM_SECONDS.observe(time.perf_counter() - started)
                error_class, retryable, delay = classify(error)
                if error_class == "other":
                    raise
                metrics.LLM_ERRORS.labels(error_class).inc()
                message = self._scrub(describe_api_error(error))
                api_message = (getattr(error, "message", "") or "") if error_class == "bad_request" else ""
                if not retryable or attempt >= self.settings.llm_max_retries:
                    metrics.LLM_CALLS.labels(error_class).inc()
                    why = "not retried" if not retryable else f"after {attempt} retries"
                    log.warning("LLM call failed (%s, %s): %s", error_class, why, message)
                    raise LLMCallFailed(message, error_class, api_message) from None
                if delay is not None and delay > MAX_RETRY_AFTER:
                    metrics.LLM_CALLS.labels(error_class).inc()
                    log.warning("LLM call failed (%s): the endpoint asks to wait %.0f s; not waiting", error_class, delay)
                    raise LLMCallFailed(message, error_class) from None
                delay = self.backoff(attempt) if delay is None else delay
                left = deadline.time_left()
                if left is not None and delay >= left:
                    metrics.LLM_CALLS.labels(error_class).inc()
                    log.warning("LLM call failed (%s) and no time is left to retry: %s", error_class, message)
                    raise LLMCallFailed(message, error_class) from None
                metrics.LLM_RETRIES.labels(error_class).inc()
                log.info("LLM call failed (%s: %s); retry %d in %.2f s", error_class, message, attempt + 1, delay)
                self._sleep(delay)
                attempt += 1
                continue
            metrics.LLM_SECONDS.observe(time.perf_counter() - started)
            metrics.LLM_CALLS_OK.inc()
            usage = _usage_of(response)
            total = usage.prompt_tokens + usage.completion_tokens if response.get("usage") else estimate
            self.limiter.settle(handle, total)
            return response

    def complete(
        self,
        messages: list[dict[str, str]],
        json_schema: dict[str, Any] | None = None,
        *,
        n: int = 1,
        temperature: float = 0.0,
    ) -> Completion:
        mode = self._first_mode()
        while True:
            kwargs: dict[str, Any] = {
                "model": self.model,
                "messages": messages,
                "temperature": temperature,
                "max_tokens": self.max_tokens,
            }
            if n > 1:
                kwargs["n"] = n
            with self._lock:
                want_logprobs = self._logprobs_ok
            if want_logprobs:
                kwargs["logprobs"] = True
            if mode == "json_schema" and json_schema is not None:
                kwargs["response_format"] = {"type": "json_schema", "json_schema": json_schema}
            elif mode == "json_object":
                kwargs["response_format"] = {"type": "json_object"}
            try:
                response = self._create(kwargs)
            except LLMCallFailed as error:
                if error.error_class != "bad_request":
                    raise
                message = error.api_message.lower()
                if want_logprobs and "logprob" in message:
                    log.info("LLM endpoint rejected logprobs; asking without them (spans get no logprob score)")
                    with self._lock:
                        self._logprobs_ok = False
                    continue
                can_fall_back = (
                    self.settings.llm_structured_output == "auto"
                    and mode != "text"
                    and any(hint in message for hint in _FORMAT_HINTS)
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
            choices = [Choice(_content_of(c), _token_logprobs(c)) for c in raw_choices]
            return Completion(choices[0].content, usage, mode, choices=choices)

    def ask_full(
        self,
        messages: list[dict[str, str]],
        parse: Callable[[str | None], T],
        repair_prompt: Callable[[str], str],
        json_schema: dict[str, Any] | None = None,
        *,
        samples: int = 1,
        temperature: float = 0.0,
    ) -> Answer[T]:
        """Ask (for `samples` answers), parse; when no answer parses, ask once more showing the model its error."""
        usage = Usage()
        completion = self.complete(messages, json_schema, n=samples, temperature=temperature)
        usage.add(completion.usage)
        values: list[T] = []
        first_error: LLMOutputError | None = None
        for choice in completion.choices:
            try:
                values.append(parse(choice.content))
            except LLMOutputError as error:
                first_error = first_error or error
        # one answer: it must parse; several samples: those that parse are enough
        if values and (first_error is None or samples > 1):
            return Answer(values, completion, usage)
        log.info("LLM answer invalid (%s); asking once more", first_error)
        repaired = [
            *messages,
            {"role": "assistant", "content": completion.content or ""},
            {"role": "user", "content": repair_prompt(str(first_error))},
        ]
        completion = self.complete(repaired, json_schema)
        usage.add(completion.usage)
        return Answer([parse(completion.content)], completion, usage)


def _usage_of(response: dict[str, Any]) -> Usage:
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return Usage(calls=1)
    count = lambda key: usage.get(key) if isinstance(usage.get(key), int) else 0  # noqa: E731
    return Usage(prompt_tokens=count("prompt_tokens"), completion_tokens=count("completion_tokens"), calls=1)


def _content_of(choice: Any) -> str | None:
    """The answer text of one choice; anything else (content parts, null) is no text."""
    message = choice.get("message") if isinstance(choice, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else None


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
