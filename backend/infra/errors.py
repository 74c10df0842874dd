"""The project's exceptions: each says what went wrong in words a user can act on."""


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
