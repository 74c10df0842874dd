"""The one way secrets are kept out of what leaves the process: logs, HTTP answers, job records, CLI
output, report files.

Whole secrets are masked, in every form they take in text: as written, URL-encoded (a password in a
URL's userinfo or a form body) and JSON-escaped (a secret quoted in a JSON answer or log line). Never
a part of one: masking the first characters of a password hid every ordinary word that started the
same way (a password starting with "models" blanked that word in every file path of the log). Any
URL's userinfo password is masked too, configured or not (`scheme://user:***@host`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, unquote, urlsplit

MASK = "***"
# a shorter value is no secret worth the name, and masking it would blank ordinary words
MIN_SECRET = 4
# `://user:password@`: the literal start lets the regex engine skip ahead with a fast search
_USERINFO = re.compile(r"(://[^\s/?#@:\"'<>\\]*:)([^\s/?#@\"'<>\\]+)(@)")
# the settings that hold a secret, or a URL whose userinfo may carry one
SECRET_SETTINGS = ("OPENAI_API_KEY", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_PASS")
URL_SETTINGS = ("OPENAI_BASE_URL", "LABEL_STUDIO_URL", "DATABASE_URL", "REDIS_URL")


# where `shortened` may cut a text: between words, at the quotes and brackets around a value, or before
# a character outside ASCII (keys and tokens are ASCII; a Chinese message has no space to cut at)
_CUT_AT = re.compile(r"[\s\"'<>()\[\]{},;]|[^\x00-\x7f]")


def shortened(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters (and "…") at a word's edge, never inside a word: a key or
    a URL cut in half is no longer the secret `Secrets.mask` looks for, and its head would go out
    unmasked (texts are cut where they are made, masked later on their way out)."""
    if len(text) <= limit:
        return text
    edges = [m.start() for m in _CUT_AT.finditer(text, 0, limit + 1)]
    return text[: edges[-1]].rstrip() + "…" if edges else "…"


def _forms(secret: str) -> set[str]:
    """The ways `secret` is spelled in text: as is, URL-encoded, JSON-escaped."""
    escaped = {json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    return {secret, quote(secret, safe=""), quote(secret), quote_plus(secret), *escaped}


def url_password(url: str) -> str | None:
    """The password a URL (or a PostgreSQL key=value connection string) carries, decoded."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        return unquote(password)
    if "password" in url:  # libpq's "host=... password=..." form, or a postgresql:// URL's ?password=
        try:
            from psycopg.conninfo import conninfo_to_dict

            return conninfo_to_dict(url).get("password") or None
        except Exception:  # unparsable: nothing to extract
            return None
    return None


class Secrets:
    """The secrets a process knows, and `mask`, the one function that keeps them out of text."""

    def __init__(self, values: Iterable[str | None] = ()):
        self.values = frozenset(v for v in values if v and len(v) >= MIN_SECRET)
        forms = {form for value in self.values for form in _forms(value) if len(form) >= MIN_SECRET}
        # longest first: a secret that contains another is masked whole
        self._forms = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, self._forms))) if self._forms else None

    def __add__(self, other: Iterable[str | None]) -> Secrets:
        return Secrets([*self.values, *other])

    def __bool__(self) -> bool:
        return bool(self.values)

    def mask(self, text: str) -> str:
        """`text` with every known secret, and every URL's userinfo password, replaced by MASK."""
        # most text holds no secret: a substring test per form (C speed) before any regex work
        if self._pattern is not None and any(form in text for form in self._forms):
            text = self._pattern.sub(MASK, text)
        if "://" in text:
            text = _USERINFO.sub(lambda m: m.group(1) + MASK + m.group(3) if m.group(2) != MASK else m.group(0), text)
        return text

    @classmethod
    def from_settings(cls, settings) -> Secrets:
        values = [s.get_secret_value() for s in (settings.openai_api_key, settings.label_studio_api_key,
                                                  settings.basic_auth_pass) if s is not None]
        urls = [settings.openai_base_url, settings.label_studio_url,
                *(s.get_secret_value() for s in (settings.database_url, settings.redis_url) if s is not None)]
        return cls([*values, *(url_password(url) for url in urls if url)])

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None, env_file: str = ".env") -> Secrets:
        """The secrets a Settings would read (the environment, then `.env`), without validating
        anything: for output that must be masked before, or without, a valid configuration."""
        values = dict(environ if environ is not None else os.environ)
        if os.path.isfile(env_file):
            from dotenv import dotenv_values

            values = {**{k: v for k, v in dotenv_values(env_file).items() if v is not None}, **values}
        names = {name.upper(): value for name, value in values.items()}
        return cls([*(names.get(n) for n in SECRET_SETTINGS),
                    *(url_password(names[n]) for n in URL_SETTINGS if names.get(n))])
