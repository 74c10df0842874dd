"""The trust table: for every route of the HTTP server and every mode, what a caller must prove.

One table (`TABLE`), consulted by every route through one `Gate`: the server asks it before each
request (`Gate.check_request`: the route's own row), and again where a route learns what the request
would do (`Gate.check`: a new label config, a webhook event, a job's project). A cell lists proofs:

- nothing: anyone who reaches the port;
- credentials: the basic-auth pair (BASIC_AUTH_USER/PASS), 401 without it;
- token: a Label Studio API key, sent as `Authorization: Token <key>`, that Label Studio takes and
  that shows its user the project (checked at Label Studio with that key), 403 without it;
- Label Studio: what the request acts on is read back from Label Studio with the backend's own key
  (LABEL_STUDIO_URL/_API_KEY) and only that is used: a label config must be the project's, an
  annotation, a deletion and new tasks are what Label Studio shows, whatever the payload says;
- refused: not offered in this mode (403), whatever the caller sends.

The mode follows from the settings (`Mode.of`). docs list the table as `markdown()` renders it
(tests/test_trust_table.py checks that they agree, and walks every cell against a real Label Studio).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from backend.infra.errors import BadRequest
from backend.infra.settings import Settings
from backend.learning.labelstudio import LabelStudioSource
from backend.learning.webhooks import Trust


class Mode(StrEnum):
    OPEN = "open"
    AUTHENTICATED = "authenticated"
    VERIFIED = "verified"
    BOTH = "authenticated and verified"

    @classmethod
    def of(cls, settings: Settings) -> Mode:
        # what makes a mode is said once, by the webhook handlers' Trust, whose name is the mode's
        return cls(Trust.from_settings(settings).name)

    @property
    def settings(self) -> str:
        return {Mode.OPEN: "neither", Mode.AUTHENTICATED: "`BASIC_AUTH_USER`/`PASS`",
                Mode.VERIFIED: "`LABEL_STUDIO_URL`/`_API_KEY`", Mode.BOTH: "both"}[self]


class Proof(StrEnum):
    CREDENTIALS = "credentials"
    TOKEN = "token"
    LABEL_STUDIO = "Label Studio"
    REFUSED = "refused"


@dataclass(frozen=True)
class Cell:
    proofs: frozenset[Proof]
    note: str = ""

    def text(self) -> str:
        if Proof.REFUSED in self.proofs:
            said = "refused (403)"
        else:
            said = " + ".join(p.value for p in Proof if p in self.proofs) or "nothing"
        return f"{said}: {self.note}" if self.note else said


def cell(*proofs: Proof, note: str = "") -> Cell:
    return Cell(frozenset(proofs), note)


@dataclass(frozen=True)
class Row:
    action: str  # a route ("POST /setup") or what a request to it would do ("POST /setup: ...")
    effect: str  # reads, spends (LLM calls), writes (stored state, Label Studio)
    cells: dict[Mode, Cell]

    @property
    def route(self) -> str:
        return self.action.split(": ", 1)[0]


C, T, L, X = Proof.CREDENTIALS, Proof.TOKEN, Proof.LABEL_STUDIO, Proof.REFUSED


def _row(action: str, effect: str, open_: Cell, authenticated: Cell, verified: Cell, both: Cell) -> Row:
    return Row(action, effect, {Mode.OPEN: open_, Mode.AUTHENTICATED: authenticated, Mode.VERIFIED: verified, Mode.BOTH: both})


def _anyone_or_credentials(action: str, effect: str, note: str = "") -> Row:
    return _row(action, effect, cell(note=note), cell(C, note=note), cell(note=note), cell(C, note=note))


NO_LABEL_STUDIO = "needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
SETUP = "POST /setup: a new or changed label config"
PREDICT_CONFIG = "POST /predict: a new or changed label config"
ANNOTATION = "POST /webhook: ANNOTATION_CREATED, ANNOTATION_UPDATED"
DELETED = "POST /webhook: ANNOTATIONS_DELETED"
TRAINING = "POST /webhook: START_TRAINING"
WARM_START = "POST /webhook: TASKS_CREATED (warm start)"

TABLE: tuple[Row, ...] = (
    Row("GET /", "reads", {m: cell(note="probes") for m in Mode}),
    Row("GET /health", "reads", {m: cell(note="probes") for m in Mode}),
    _anyone_or_credentials("GET /metrics", "reads"),
    _anyone_or_credentials("POST /setup", "reads", note="the label config stored already: nothing changes"),
    _row(SETUP, "writes",
         cell(note="at most SETUP_PROJECTS_PER_HOUR projects created or changed an hour (429 beyond)"),
         cell(C),
         cell(L, note="stored only if it is the project's config in Label Studio (403 otherwise)"),
         cell(C)),
    _anyone_or_credentials("POST /predict", "spends",
                           note="within MAX_REQUEST_BYTES, MAX_TEXT_CHARS and PREDICT_CONCURRENCY"),
    _row(PREDICT_CONFIG, "writes",
         cell(note="stored as by /setup (within SETUP_PROJECTS_PER_HOUR); beyond, only used for the answer"),
         cell(C),
         cell(L, note="stored only if it is the project's config in Label Studio; otherwise only used for the answer"),
         cell(C)),
    _anyone_or_credentials("POST /webhook", "reads", note="a known project; events learnt from as below"),
    _row(ANNOTATION, "writes",
         cell(note="the payload, within bounds (ids, times, sizes, MAX_EXAMPLES, MAX_EXAMPLE_CHARS)"),
         cell(C, note="the payload, within the same bounds"),
         cell(L, note="the annotation and its task as Label Studio holds them; an id it lacks is forgotten only if stored"),
         cell(C, L)),
    _row(DELETED, "writes",
         cell(note="only annotations the store holds"),
         cell(C, note="any id (a late update cannot bring it back)"),
         cell(L, note="only annotations the store holds and Label Studio no longer has"),
         cell(C, L)),
    _row(TRAINING, "writes",
         cell(X, note=NO_LABEL_STUDIO), cell(X, note=NO_LABEL_STUDIO),
         cell(L, note="the examples become what Label Studio holds; at most once per START_TRAINING_INTERVAL"),
         cell(C, L)),
    _row(WARM_START, "spends",
         cell(X, note="WARM_START with an open webhook would pay for anyone's tasks"),
         cell(C, note="the payload's tasks"),
         cell(L, note="only tasks Label Studio shows as created within WARM_START_WINDOW, without prediction or annotation"),
         cell(C, L)),
    _anyone_or_credentials("GET /jobs", "reads"),
    _anyone_or_credentials("GET /jobs/<job_id>", "reads"),
    _row("POST /jobs", "spends",
         cell(X, note=NO_LABEL_STUDIO), cell(X, note=NO_LABEL_STUDIO),
         cell(T, note="a Label Studio user's key that reaches the job's project"), cell(C)),
    _row("DELETE /jobs/<job_id>", "writes",
         cell(X, note=NO_LABEL_STUDIO), cell(X, note=NO_LABEL_STUDIO),
         cell(T, note="a Label Studio user's key that reaches the job's project"), cell(C)),
)
ROWS: dict[str, Row] = {row.action: row for row in TABLE}
# the webhook events whose rows say more than the route's (other events are ignored)
EVENTS = {"ANNOTATION_CREATED": ANNOTATION, "ANNOTATION_UPDATED": ANNOTATION, "ANNOTATIONS_DELETED": DELETED,
          "START_TRAINING": TRAINING, "TASKS_CREATED": WARM_START}
ROUTES: frozenset[str] = frozenset(row.action for row in TABLE if ": " not in row.action)


def markdown() -> str:
    """The table as the docs show it."""
    lines = ["| route / what it would do | effect | " + " | ".join(m.value for m in Mode) + " |",
             "|---|---|" + "---|" * len(Mode)]
    for row in TABLE:
        cells = " | ".join(row.cells[m].text() for m in Mode)
        lines.append(f"| `{row.action}` | {row.effect} | {cells} |")
    return "\n".join(lines)


class Unproven(BadRequest):
    """The caller did not prove what the table asks (401: credentials; 403: the rest; 429: a bound)."""

    def __init__(self, message: str, status: int, retry_after: int | None = None):
        super().__init__(message, status=status)
        self.retry_after = retry_after


_TOKEN = re.compile(r"(?:Token|Bearer) ([A-Za-z0-9._~+/=-]{8,4096})", re.IGNORECASE)


class Gate:
    """Enforces TABLE for one process (Services holds it). `credentials_ok` says whether the current
    request carries the basic-auth pair (the server checks it); `token` is the caller's Label Studio key."""

    def __init__(self, settings: Settings, source: LabelStudioSource | None, db: Any):
        self.mode = Mode.of(settings)
        self.settings = settings
        self.source = source
        self.db = db

    def cell(self, action: str) -> Cell:
        return ROWS[action].cells[self.mode]

    def check(self, action: str, *, credentials_ok: bool, authorization: str = "", project: object = None,
              label_config: str | None = None, early: bool = False) -> Cell:
        """Raise Unproven unless the caller proved what `action`'s cell asks; return the cell. `early`:
        before the body is read (the route asks again for a token, once it knows the project). A cell
        asking Label Studio for an annotation, a deletion or tasks is kept by the webhook handlers
        (learning/webhooks.py), which are given the source in those modes; a label config is checked here."""
        cell = self.cell(action)
        if X in cell.proofs:
            raise Unproven(f"{action} is not offered in {self.mode.value} mode: {cell.note}", 403)
        if C in cell.proofs and not credentials_ok:
            raise Unproven("authentication required", 401)
        if T in cell.proofs and not early:
            self._token(action, authorization, project)
        if L in cell.proofs and label_config is not None:
            self._label_config(action, project, label_config)
        if not cell.proofs and label_config is not None:
            self._new_projects(action)
        return cell

    def _token(self, action: str, authorization: str, project: object) -> None:
        match = _TOKEN.fullmatch(authorization.strip())
        if match is None:
            raise Unproven(f"{action}: send a Label Studio API key as `Authorization: Token <key>`", 403)
        assert self.source is not None  # a token cell is only in modes with Label Studio credentials
        if not (isinstance(project, int) and self.source.token_reaches(match.group(1), project)):
            raise Unproven(f"{action}: Label Studio does not show project {project} to the key sent", 403)

    def _label_config(self, action: str, project: object, label_config: str) -> None:
        assert self.source is not None
        ours = self.source.label_config(int(project)) if str(project).isdigit() else None
        if ours != label_config:
            raise Unproven(f"{action}: not the label config Label Studio holds for project {project}", 403)

    def _new_projects(self, action: str) -> None:
        limit = self.settings.setup_projects_per_hour
        changed = self.db.projects_changed_since(time.time() - 3600)
        if changed >= limit:
            raise Unproven(
                f"{action}: {changed} projects were created or changed in the last hour, "
                f"SETUP_PROJECTS_PER_HOUR={limit}", 429, retry_after=600,
            )
