"""The provider call: chat completions through the openai client, against any compatible endpoint.

Structured output is asked for in the strongest form the endpoint accepts: `json_schema`, then
`json_object`, then plain text parsed tolerantly. The mode that worked is remembered per process.
One repair turn shows the model its own validation error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import openai
from openai import OpenAI

from backend.errors import LLMError, LLMOutputError
from backend.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

MODES = ("json_schema", "json_object", "text")
# words in a 400/422 that mean "this endpoint does not do that response_format"
_FORMAT_HINTS = ("response_format", "json_schema", "json_object", "schema", "format", "support")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0

    def add(self, other: "Usage") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.calls += other.calls


@dataclass
class Completion:
    content: str | None
    usage: Usage
    mode: str
    raw: Any = field(default=None, repr=False)


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
    return f"{type(error).__name__}: {error}"


class LLMClient:
    def __init__(self, settings: Settings, client: OpenAI | None = None):
        self.settings = settings
        # one client per process (see services.py), so this remembers per process what the endpoint accepts
        self._working_mode: str | None = None
        self._lock = threading.Lock()
        self.model = settings.llm_model
        self.client = client or OpenAI(
            api_key=settings.openai_api_key.get_secret_value(),
            base_url=settings.openai_base_url,
            timeout=settings.llm_timeout,
            max_retries=2,
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

    def complete(self, messages: list[dict[str, str]], json_schema: dict[str, Any] | None = None) -> Completion:
        mode = self._first_mode()
        while True:
            kwargs: dict[str, Any] = {}
            if mode == "json_schema" and json_schema is not None:
                kwargs["response_format"] = {"type": "json_schema", "json_schema": json_schema}
            elif mode == "json_object":
                kwargs["response_format"] = {"type": "json_object"}
            try:
                response = self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,  # type: ignore[arg-type]
                    temperature=0,
                    max_tokens=self.settings.llm_max_tokens,
                    **kwargs,
                )
            except (openai.BadRequestError, openai.UnprocessableEntityError) as error:
                message = (getattr(error, "message", "") or str(error)).lower()
                can_fall_back = (
                    self.settings.llm_structured_output == "auto"
                    and mode != "text"
                    and any(hint in message for hint in _FORMAT_HINTS)
                )
                if not can_fall_back:
                    raise LLMError(describe_api_error(error)) from None
                next_mode = MODES[MODES.index(mode) + 1]
                log.info("LLM endpoint rejected response_format %s; falling back to %s", mode, next_mode)
                mode = next_mode
                continue
            except openai.OpenAIError as error:
                raise LLMError(describe_api_error(error)) from None
            self._remember(mode)
            usage = Usage(calls=1)
            if response.usage is not None:
                usage.prompt_tokens = response.usage.prompt_tokens or 0
                usage.completion_tokens = response.usage.completion_tokens or 0
            if not response.choices:
                raise LLMOutputError("the LLM endpoint returned no choices")
            return Completion(response.choices[0].message.content, usage, mode, raw=response)

    def ask(
        self,
        messages: list[dict[str, str]],
        parse: Callable[[str | None], T],
        repair_prompt: Callable[[str], str],
        json_schema: dict[str, Any] | None = None,
    ) -> tuple[T, Usage]:
        """Ask, parse; on a parse error ask once more showing the model its error."""
        usage = Usage()
        completion = self.complete(messages, json_schema)
        usage.add(completion.usage)
        try:
            return parse(completion.content), usage
        except LLMOutputError as error:
            log.info("LLM answer invalid (%s); asking once more", error)
            repaired = [
                *messages,
                {"role": "assistant", "content": completion.content or ""},
                {"role": "user", "content": repair_prompt(str(error))},
            ]
        completion = self.complete(repaired, json_schema)
        usage.add(completion.usage)
        return parse(completion.content), usage
