"""Logging set-up, with every configured secret masked in whatever gets written."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

MASK = "***"
# the shortest start or end of a secret masked on its own: servers echo keys cut short ("sk-proj-abc...")
FRAGMENT = 6


def _mask_fragments(text: str, secret: str) -> str:
    """Mask every run of `text` that is the start of `secret` (FRAGMENT characters or more), then every
    run that is its end."""
    head = secret[:FRAGMENT]
    at = text.find(head)
    while at != -1:
        end = at + len(head)
        while end < len(text) and end - at < len(secret) and text[end] == secret[end - at]:
            end += 1
        text = text[:at] + MASK + text[end:]
        at = text.find(head, at + len(MASK))
    tail = secret[-FRAGMENT:]
    at = text.find(tail)
    while at != -1:
        start, end = at, at + len(tail)
        while start > 0 and end - start < len(secret) and text[start - 1] == secret[len(secret) - (end - start) - 1]:
            start -= 1
        text = text[:start] + MASK + text[end:]
        at = text.find(tail, start + len(MASK))
    return text


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with each secret masked, and each start or end of one (at least FRAGMENT characters)."""
    ordered = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)  # a secret containing another: whole
    for secret in ordered:
        text = text.replace(secret, MASK)
    for secret in ordered:
        if len(secret) > FRAGMENT:
            text = _mask_fragments(text, secret)
    return text


class RedactingFormatter(logging.Formatter):
    """Masks secrets in the final line, so arguments, exceptions and third-party messages are covered."""

    def __init__(self, fmt: str, secrets: Iterable[str]):
        super().__init__(fmt)
        self.secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


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
    values = [settings.openai_api_key, settings.basic_auth_pass, settings.label_studio_api_key, settings.database_url,
              settings.redis_url]
    secrets = [v.get_secret_value() for v in values if v is not None]
    if settings.database_url is not None:  # its password alone, too (psycopg messages never echo it, but a log line may)
        from backend.infra.storage import url_password

        secrets += [p for p in [url_password(settings.database_url.get_secret_value())] if p]
    return secrets
