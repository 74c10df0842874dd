"""The backend's own calls back to Label Studio, through the SDK (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY).

What a webhook only announces is read here from the source: a task's data and its annotations come
from the Data Manager's task list, which never makes Label Studio call /predict (`GET /api/tasks/{id}`
does, for a task without a prediction: PROTOCOL.md); whether an annotation still exists comes from
`GET /api/annotations/{id}`. START_TRAINING reads every task of the project the same way.

Securing a project's webhook (`secure_webhooks`): Label Studio creates the ML backend's webhook
without headers; we add `Authorization: Basic ...` to it, but only to the webhook of an ML backend
that Label Studio already calls with these very credentials, so they never go anywhere new.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from backend.infra.errors import BackendError
from backend.infra.masking import shortened

log = logging.getLogger(__name__)

# the Data Manager's list carries the wanted task ids in its query string: a few hundred at a time
TASKS_PER_CALL = 200


class LabelStudioUnavailable(BackendError):
    """Label Studio could not be asked (down, refusing our key, answering errors)."""


def field_of(obj: Any, name: str, default: Any = None) -> Any:
    """A field of what the SDK returns: a pydantic model, or a plain dict for nested values."""
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def basic_auth_header(user: str, password: str) -> str:
    """What an HTTP client sends for these credentials (UTF-8, as Label Studio's `requests` does for str)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _plain_annotation(annotation: Any) -> dict[str, Any]:
    return {
        "id": field_of(annotation, "id"),
        "result": field_of(annotation, "result") or [],
        "was_cancelled": bool(field_of(annotation, "was_cancelled", False)),
        "updated_at": field_of(annotation, "updated_at"),
    }


def _plain_task(task: Any) -> dict[str, Any]:
    annotations = field_of(task, "annotations") or []
    return {
        "id": field_of(task, "id"),
        "data": field_of(task, "data") or {},
        "annotations": [_plain_annotation(a) for a in annotations],
        "created_at": field_of(task, "created_at"),  # a datetime (the SDK's), or None
        # what the warm start needs to know: has the task been predicted or annotated already
        "predictions": max(int(field_of(task, "total_predictions") or 0), len(field_of(task, "predictions") or [])),
        "annotated": max(int(field_of(task, "total_annotations") or 0), len(annotations)),
    }


def _answer_text(body: Any) -> str:
    """Label Studio's answer body as text: its `detail` and each of its validation errors, as written."""
    if not isinstance(body, (dict, list)):
        return "" if body is None else str(body)
    errors = body.get("validation_errors") if isinstance(body, dict) else None
    if isinstance(errors, dict):
        said = [f"{'' if name == 'non_field_errors' else name + ': '}{message}" for name, messages in errors.items()
                for message in (messages if isinstance(messages, list) else [messages])]
        return f"{body.get('detail') or 'refused'}: " + "; ".join(map(str, said))
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return body["detail"]
    return json.dumps(body, ensure_ascii=False)


def describe_error(error: BaseException) -> str:
    """What a job record, a log line or an answer says of an error: the one way such texts are made.

    For the SDK's errors, the status and Label Studio's answer body (why it refused: its validation
    errors), never the answer's headers, which `str()` of them includes (a session cookie); otherwise
    the error's type and text. Cut at words' edges (`shortened`): a key the text quotes stays whole,
    and masking finds it on the way out."""
    status = getattr(error, "status_code", None)
    if status is None:
        return shortened(f"{type(error).__name__}: {error}", 300)
    said = " ".join(_answer_text(getattr(error, "body", None)).split())  # an HTML error page: one line
    if len(said) > 300:  # its head and its end: Label Studio quotes what it refused first, then says why
        said = shortened(said, 150) + " " + shortened(said[::-1], 150)[::-1].lstrip("…").lstrip()
    return f"HTTP {status} from Label Studio" + (f": {said}" if said else "")


def sdk_client(url: str, api_key: str, timeout: float | None = None) -> Any:
    """The SDK's client for what the backend and its tools call (projects, tasks, annotations,
    predictions). Not `label_studio_sdk.client.LabelStudio`: its projects extension imports pandas for
    DataFrame exports, a third of a project job's memory (~50 MB), and nothing here exports. What its
    extensions do for listings is kept: a listing ends at the 404 Label Studio answers past the last page."""
    from label_studio_sdk._extensions.pager_ext import SyncPagerExt
    from label_studio_sdk.base_client import LabelStudioBase
    from label_studio_sdk.projects.client import ProjectsClient
    from label_studio_sdk.tasks.client_ext import TasksClientExt

    class Projects(ProjectsClient):
        def list(self, **kwargs: Any) -> Any:
            return SyncPagerExt.from_sync_pager(super().list(**kwargs))

    class LabelStudio(LabelStudioBase):
        @property
        def tasks(self) -> TasksClientExt:  # type: ignore[override]
            if self._tasks is None:
                self._tasks = TasksClientExt(client_wrapper=self._client_wrapper)
            return self._tasks

        @property
        def projects(self) -> Projects:  # type: ignore[override]
            if self._projects is None:
                self._projects = Projects(client_wrapper=self._client_wrapper)
            return self._projects

    return LabelStudio(base_url=url, api_key=api_key, timeout=timeout)


class LabelStudioSource:
    """One per process (Services holds it): the SDK client is made once and shared by threads."""

    def __init__(self, url: str, api_key: str, timeout: float = 10.0):
        self.url = url
        self._api_key = api_key
        self._timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = sdk_client(self.url, self._api_key, self._timeout)
            return self._client

    # ---- reading ----
    def tasks(self, project_id: int, task_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """{task id: {"id", "data", "annotations": [{"id", "result", "was_cancelled", "updated_at"}]}}
        for those of these tasks that are in the project; a task missing from the answer is not there."""
        wanted = sorted({int(i) for i in task_ids})
        found: dict[int, dict[str, Any]] = {}
        try:
            for start in range(0, len(wanted), TASKS_PER_CALL):
                part = wanted[start : start + TASKS_PER_CALL]
                query = json.dumps({"selectedItems": {"all": False, "included": part}})
                for task in self.client.tasks.list(project=project_id, query=query, fields="all", page_size=TASKS_PER_CALL):
                    plain = _plain_task(task)
                    if plain["id"] in part:
                        found[plain["id"]] = plain
        except Exception as error:
            raise LabelStudioUnavailable(f"could not read tasks of project {project_id}: {describe_error(error)}") from None
        return found

    def annotation_exists(self, annotation_id: int) -> bool:
        """Whether Label Studio still has this annotation (a 404 is the only "no")."""
        try:
            self.client.annotations.get(id=int(annotation_id))
        except Exception as error:
            if getattr(error, "status_code", None) == 404:
                return False
            raise LabelStudioUnavailable(f"could not read annotation {annotation_id}: {describe_error(error)}") from None
        return True

    def label_config(self, project_id: int) -> str | None:
        """The project's label config as Label Studio holds it; None when it has no such project."""
        try:
            project = self.client.projects.get(id=int(project_id))
        except Exception as error:
            if getattr(error, "status_code", None) == 404:
                return None
            raise LabelStudioUnavailable(f"could not read project {project_id}: {describe_error(error)}") from None
        return field_of(project, "label_config")

    def token_reaches(self, token: str, project_id: int) -> bool:
        """Whether Label Studio takes `token` (a user's API key) and shows its user this project: what a
        caller proves by sending `Authorization: Token <key>` (401, 403 and 404 are "no")."""
        try:
            sdk_client(self.url, token, self._timeout).projects.get(id=int(project_id))
        except Exception as error:
            if getattr(error, "status_code", None) in (401, 403, 404):
                return False
            raise LabelStudioUnavailable(f"could not check a token at Label Studio: {describe_error(error)}") from None
        return True

    def all_tasks(self, project_id: int) -> Iterator[dict[str, Any]]:
        """Every task of the project with its annotations (START_TRAINING)."""
        for task in self.client.tasks.list(project=project_id, fields="all"):
            yield _plain_task(task)

    # ---- securing the webhook ----
    def secure_webhooks(self, project_id: int, user: str, password: str) -> list[str]:
        """Make the project's ML-backend webhook send our basic auth; idempotent. One line per thing done."""
        header = basic_auth_header(user, password)
        client = self.client
        try:
            backends = [
                ml for ml in client.ml.list(project=project_id)
                if str(field_of(ml, "auth_method") or "").upper() == "BASIC_AUTH" and field_of(ml, "basic_auth_user") == user
            ]
            if not backends:
                return [f"project {project_id}: no ML backend connected with basic auth as {user!r}: no webhook secured"]
            wanted = {str(field_of(ml, "url")).rstrip("/") + "/webhook" for ml in backends}
            lines = []
            for hook in client.webhooks.list(project=str(project_id)):
                url = str(field_of(hook, "url") or "").rstrip("/")
                if url not in wanted or field_of(hook, "project") not in (None, project_id):
                    continue
                wanted.discard(url)
                headers = dict(field_of(hook, "headers") or {}) if isinstance(field_of(hook, "headers"), dict) else {}
                said = f"project {project_id}: webhook {field_of(hook, 'id')} ({url})"
                if headers.get("Authorization") == header:
                    lines.append(f"{said} already sends the backend's basic auth")
                    continue
                headers["Authorization"] = header
                client.webhooks.update(id=field_of(hook, "id"), headers=headers)
                lines.append(f"{said} now sends the backend's basic auth")
            for url in sorted(wanted):
                lines.append(
                    f"project {project_id}: Label Studio has no webhook {url} (with SSRF_PROTECTION_ENABLED it never makes one): "
                    "corrections will not reach the backend"
                )
            return lines
        except Exception as error:
            what = f"could not secure the webhook of project {project_id}"
            raise LabelStudioUnavailable(f"{what}: {describe_error(error)}") from None


class WebhookSecuring:
    """After an authenticated /setup, secure the project's webhook in the background: once per project
    and process while it holds (re-checked hourly), retried a minute after a failure. Held by Services."""

    RECHECK = 3600.0
    RETRY = 60.0

    def __init__(self, source: LabelStudioSource, user: str, password: str):
        self.source = source
        self._user = user
        self._password = password
        self._next: dict[str, float] = {}  # project -> monotonic time of the next attempt
        self._lock = threading.Lock()

    def after_setup(self, project_id: str) -> threading.Thread | None:
        if not project_id.isdigit():
            return None  # not a Label Studio project (a test or a tool's own name)
        now = time.monotonic()
        with self._lock:
            if self._next.get(project_id, 0.0) > now:
                return None
            self._next[project_id] = now + self.RECHECK  # also keeps a second thread from starting
        thread = threading.Thread(target=self._secure, args=(project_id,), name=f"secure-webhook-{project_id}", daemon=True)
        thread.start()
        return thread

    def _secure(self, project_id: str) -> None:
        try:
            for line in self.source.secure_webhooks(int(project_id), self._user, self._password):
                log.info("%s", line)
        except LabelStudioUnavailable as error:
            log.warning("%s; retrying in %.0f s", error, self.RETRY)
            with self._lock:
                self._next[project_id] = time.monotonic() + self.RETRY
