"""Logging set-up, with every configured secret masked in whatever gets written."""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from backend.infra.masking import Secrets


def _secrets(secrets: Secrets | Iterable[str]) -> Secrets:
    return secrets if isinstance(secrets, Secrets) else Secrets(secrets)


class RedactingFormatter(logging.Formatter):
    """Masks secrets in the final line, so arguments, exceptions and third-party messages are covered."""

    def __init__(self, fmt: str, secrets: Secrets | Iterable[str]):
        super().__init__(fmt)
        self.secrets = _secrets(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return self.secrets.mask(super().format(record))


# what the work of this context is about ("task 12"), put before each of its log lines: a line such as
# "dropped entities" or an LLM timeout comes from layers that never see the task. A ContextVar, so it
# follows the work into the threads of map_in_order (which copies the context)
_subject: contextvars.ContextVar[str | None] = contextvars.ContextVar("log_subject", default=None)


@contextmanager
def about(subject: str | None) -> Iterator[None]:
    """Log lines written inside say `subject: ` first (None: unchanged)."""
    token = _subject.set(subject)
    try:
        yield
    finally:
        _subject.reset(token)


def _add_subject(record: logging.LogRecord) -> bool:
    subject = _subject.get()
    # a line that names its subject itself (for the tests' captured logs too) is not prefixed twice
    record.subject = f"{subject}: " if subject and not record.getMessage().startswith(f"{subject}:") else ""
    return True


def configure_logging(level: str, secrets: Secrets | Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_add_subject)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(process)d %(name)s: %(subject)s%(message)s", secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # the HTTP libraries log request details (headers at DEBUG): keep them at WARNING
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def settings_secrets(settings) -> Secrets:
    return Secrets.from_settings(settings)
