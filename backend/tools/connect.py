"""`llm-ner connect`: connect the backend to a Label Studio project the way it is meant to run.

1. the backend becomes the project's model (Settings -> Model), with its basic auth when it has one,
   interactive pre-annotation on or off;
2. "use predictions to prelabel" is on, with this model's predictions;
3. the project's webhook for the backend carries the basic auth (Label Studio makes it without);
4. Label Studio itself checks that it reaches the backend (/health, then /setup).
Each step says what it did; a second run changes nothing and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backend.infra.errors import BackendError
from backend.infra.masking import shortened
from backend.learning.labelstudio import LabelStudioSource, LabelStudioUnavailable, field_of
from backend.tools.importer import LabelStudioError, sdk_errors

TITLE = "llm-ner"


class ConnectFailed(BackendError):
    """Label Studio does not reach the backend, or refused a step; the message says which."""


@dataclass
class Connection:
    project_id: int
    model_id: int
    lines: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return "\n".join(self.lines)


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def connect_backend(
    client: Any, source: LabelStudioSource, project_id: int, backend_url: str, *, interactive: bool = False,
    user: str | None = None, password: str | None = None,
) -> Connection:
    """Connect, turn on pre-labels, secure the webhook, check; raises ConnectFailed saying what failed."""
    lines: list[str] = []
    with sdk_errors(f"reading project {project_id}"):
        project = client.projects.get(id=project_id)
    auth: dict[str, Any] = (
        {"auth_method": "BASIC_AUTH", "basic_auth_user": user, "basic_auth_pass": password} if user else {"auth_method": "NONE"}
    )
    with sdk_errors(f"listing the models of project {project_id}"):
        mine = [ml for ml in client.ml.list(project=project_id) if _same_url(str(field_of(ml, "url")), backend_url)]
    how = f"with basic auth as {user!r}" if user else "without authentication"
    how += f", interactive {'on' if interactive else 'off'}"
    try:
        if mine:
            model = mine[0]
            wanted = {"is_interactive": interactive, "auth_method": auth["auth_method"], "basic_auth_user": user}
            current = {k: field_of(model, k) for k in wanted}
            current["auth_method"] = str(current["auth_method"] or "NONE").upper()
            if current["auth_method"] == "NONE":
                current["basic_auth_user"] = None
            if current == wanted and not user:
                lines.append(f"model {field_of(model, 'id')} ({backend_url}) was already connected to project {project_id}"
                             f" ({how})")
            else:
                # a password cannot be read back from Label Studio: with basic auth it is always sent again
                # (with the url: Label Studio 1.23.2 answers a PATCH without it with a 500)
                with sdk_errors(f"updating model {field_of(model, 'id')}"):
                    model = client.ml.update(
                        id=field_of(model, "id"), url=str(field_of(model, "url")), project=project_id, is_interactive=interactive,
                        **auth,
                    )
                verb = "was already connected; its settings were sent again" if current == wanted else "was updated"
                lines.append(f"model {field_of(model, 'id')} ({backend_url}) {verb} ({how})")
        else:
            with sdk_errors(f"connecting {backend_url} to project {project_id}"):
                model = client.ml.create(url=backend_url, project=project_id, title=TITLE, is_interactive=interactive, **auth)
            lines.append(f"connected {backend_url} to project {project_id} as model {field_of(model, 'id')} ({how})")
    except LabelStudioError as error:
        raise ConnectFailed(
            f"{error}. Label Studio could not use the backend at {backend_url}: is it running, and reachable from "
            "Label Studio at that URL (a backend on localhost or a private network needs Label Studio started with "
            "ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false)?"
        ) from None
    model_id = int(field_of(model, "id"))

    # "Use predictions to prelabel tasks", with this model's predictions (what the UI sets on connect)
    changes: dict[str, Any] = {}
    if not field_of(project, "show_collab_predictions"):
        changes["show_collab_predictions"] = True
    if not field_of(project, "model_version"):
        changes["model_version"] = field_of(model, "title") or TITLE
    if changes:
        with sdk_errors(f"updating project {project_id}"):
            client.projects.update(id=project_id, **changes)
        lines.append(f"project {project_id}: predictions are now used to pre-label tasks")
    else:
        lines.append(f"project {project_id}: predictions were already used to pre-label tasks")

    if user and password:
        try:
            lines.extend(source.secure_webhooks(project_id, user, password))
        except LabelStudioUnavailable as error:
            raise ConnectFailed(str(error)) from None
    else:
        lines.append(
            f"project {project_id}: the webhook carries no credentials (BASIC_AUTH_USER/PASS unset: /webhook is open, "
            "and what it may change is bounded; see the README, \"How webhooks are trusted\")"
        )

    # Label Studio checks its models when listing them: /health, then /setup
    with sdk_errors(f"checking model {model_id}"):
        client.ml.list(project=project_id)
        checked = client.ml.get(id=model_id)
    state = str(field_of(checked, "state") or "")
    if state not in ("CO", "CONNECTED"):
        reason = field_of(checked, "error_message") or "no answer"
        raise ConnectFailed(
            f"Label Studio does not reach the backend at {backend_url} (state {state or 'unknown'}: {shortened(str(reason), 300)})"
        )
    version = field_of(checked, "model_version")
    lines.append(
        "Label Studio reaches the backend: /health and /setup answered" + (f" (model version {version})" if version else "")
    )
    return Connection(project_id, model_id, lines)
