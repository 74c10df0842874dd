"""Files the user asked for: written with secrets masked, or refused in one line naming them."""

from __future__ import annotations

from pathlib import Path

from backend.infra.errors import BackendError
from backend.infra.masking import Secrets


class OutputError(BackendError):
    """A file the user asked for cannot be written; the message names it."""


def write_output(path: str | Path, text: str) -> None:
    """Write a file the user asked for (a report, a JSON figure file), with the environment's secrets
    and any URL's password masked; a path that cannot be written (a full disk, a missing directory,
    no permission) is a one-line OutputError naming it, never a traceback."""
    try:
        Path(path).write_text(Secrets.from_environment().mask(text), encoding="utf-8")
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
