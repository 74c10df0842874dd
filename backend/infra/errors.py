"""The project's exceptions: each says what went wrong in words a user can act on."""

from __future__ import annotations

from typing import Any


class BackendError(Exception):
    """Base class for errors this package raises on purpose."""


class ConfigError(BackendError):
    """A setting is missing or invalid; the message names it (never its value)."""


class BadRequest(BackendError):
    """The caller sent something we cannot use; answered as HTTP 4xx with this message."""

    status = 400

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class UnsupportedLabelConfig(BadRequest):
    """The label config has nothing this backend can pre-label."""

    def __init__(self, message: str):
        super().__init__(message, status=422)


class LLMError(BackendError):
    """The LLM call failed for good (after any retries that could help)."""


class LLMOutputError(LLMError):
    """The LLM answered, but not with entities we can use, even after the repair retry."""


def validation_message(
    error: Any, where: str = "", *, limit: int | None = 5, upper: bool = False, whole: str = "body"
) -> str:
    """A pydantic ValidationError in one line, `where.field: what is wrong; ...`: the one wording of
    bad input for HTTP answers, the LLM's repair turn and configuration errors. It never repeats
    the offending value (pydantic's messages do not carry it), so secrets and payloads stay out."""
    parts = []
    for item in error.errors()[:limit]:
        field = ".".join(str(p) for p in item["loc"])
        field = field.upper() if upper else field
        path = ".".join(x for x in (where, field) if x) or whole  # `whole`: an error about the object itself
        message = "missing" if item["type"] == "missing" else item["msg"]
        parts.append(f"{path}: {message}")
    return "; ".join(parts)
