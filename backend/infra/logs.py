"""Logging set-up, with every configured secret masked in whatever gets written."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

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


def configure_logging(level: str, secrets: Secrets | Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s", secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # the HTTP libraries log request details (headers at DEBUG): keep them at WARNING
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def settings_secrets(settings) -> Secrets:
    return Secrets.from_settings(settings)
