"""Logging set-up, with every configured secret masked in whatever gets written."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

MASK = "***"


class RedactingFormatter(logging.Formatter):
    """Masks secrets in the final line, so arguments, exceptions and third-party messages are covered."""

    def __init__(self, fmt: str, secrets: Iterable[str]):
        super().__init__(fmt)
        # longest first, so a secret that contains another is masked whole
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        for secret in self.secrets:
            line = line.replace(secret, MASK)
        return line


def configure_logging(level: str, secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s", secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # the HTTP libraries log request details (headers at DEBUG): keep them at WARNING
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def settings_secrets(settings) -> list[str]:
    values = [settings.openai_api_key, settings.basic_auth_pass, settings.label_studio_api_key]
    return [v.get_secret_value() for v in values if v is not None]
