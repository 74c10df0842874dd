"""Request and response bodies of the ML-backend protocol (see PROTOCOL.md), as pydantic models."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, SkipValidation, StrictStr, field_validator

from backend.infra.payloads import Id, Lenient

_PROJECT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def project_id_of(value: object) -> str:
    """Label Studio sends `project` as "<id>.<timestamp>" in /predict and as "<id>" elsewhere."""
    # bool is an int: refuse it, and anything but a number or a short name (it becomes a storage key)
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    head = text.split(".", 1)[0]
    if not _PROJECT_ID.fullmatch(head):
        raise ValueError("project must be a project id such as 3 or '3.1700000000'")
    return head


def _parse_extra_params(value: object) -> object:
    """`extra_params` arrives as a JSON string or as an object (upstream crashes on the latter)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("extra_params must be a JSON object or a string holding one") from None
    return value


class SetupRequest(Lenient):
    project: str
    label_config: StrictStr = Field(alias="schema", min_length=1)
    hostname: StrictStr | None = None
    access_token: SecretStr | None = None
    model_version: StrictStr | None = None
    extra_params: dict[str, Any] | None = None

    @field_validator("project", mode="before")
    @classmethod
    def _project(cls, value: object) -> str:
        return project_id_of(value)

    @field_validator("extra_params", mode="before")
    @classmethod
    def _extra(cls, value: object) -> object:
        return _parse_extra_params(value)


class SetupResponse(BaseModel):
    model_version: str


class TaskIn(Lenient):
    # stored with drafts and deliveries: an id out of range is refused with the request, before any
    # LLM call is paid for, not at the end with the whole batch lost
    id: Id | None = None
    data: dict[str, Any]


class PredictParams(Lenient):
    context: dict[str, Any] | None = None


class PredictRequest(Lenient):
    tasks: list[TaskIn]
    project: str | None = None
    label_config: StrictStr | None = None
    params: PredictParams | None = None
    context: dict[str, Any] | None = None

    @field_validator("project", mode="before")
    @classmethod
    def _project(cls, value: object) -> str | None:
        return None if value in (None, "") else project_id_of(value)

    @property
    def interactive_context(self) -> dict[str, Any] | None:
        if self.params is not None and self.params.context:
            return self.params.context
        return self.context or None


class SpanValue(BaseModel):
    start: int
    end: int
    text: str
    labels: list[str]


class SpanResult(BaseModel):
    """One region of a prediction: a labeled span of one <Text>."""

    from_name: str
    to_name: str
    type: str = "labels"
    value: SpanValue
    score: float | None = None
    id: str | None = None
    origin: str | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class PredictionValue(BaseModel):
    """One task's prediction (named as upstream's `label_studio_ml.response.PredictionValue`)."""

    model_config = ConfigDict(protected_namespaces=())

    # Regions in the shape of SpanResult, built by prelabel.span_results (tests validate them there).
    # Not validated again here, nor walked by model_dump: a 200-task answer carries ~10,000 regions,
    # and re-validating what we built ourselves cost more than the rest of the task's own work
    # (figures: the README's "How the per-task time came down").
    result: SkipValidation[list[dict[str, Any]]] = Field(default_factory=list)
    score: float | None = None
    model_version: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"result": self.result}
        if self.score is not None:
            out["score"] = self.score
        if self.model_version is not None:
            out["model_version"] = self.model_version
        return out


class ModelResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_version: str | None = None
    # None: no prediction for that task (its pre-labels failed), see PredictResponse
    predictions: list[PredictionValue | None]


class PredictResponse(BaseModel):
    """`results` has one entry per task, in task order. A task without pre-labels (they failed: the
    provider, the deadline, a bug) is answered `[]`, an empty list of predictions: Label Studio then
    stores nothing and asks again on the next open or retrieval. `{"result": []}` would be stored
    as an empty prediction of the current model_version and block the task for good, so it is only
    ever sent for a text that really has no entities."""

    results: list[PredictionValue | None]
    model_version: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"results": [[] if p is None else p.to_json() for p in self.results]}
        if self.model_version is not None:
            out["model_version"] = self.model_version
        return out


class JobRequest(BaseModel):
    """POST /jobs: pre-label a whole project (see pipeline/jobs/)."""

    # strict: `true` is not project 1, "yes" does not start a Batch API job, "3" is not a number
    model_config = ConfigDict(extra="forbid", strict=True)

    project: Id
    scope: Literal["missing", "unannotated", "stale", "all"] = "missing"
    limit: int | None = Field(default=None, ge=1, le=10**9)
    concurrency: int | None = Field(default=None, ge=1, le=256)
    max_cost: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    batch_api: bool = False  # through the provider's Batch API: half the price, answers within 24 h


class WebhookRequest(Lenient):
    action: StrictStr = Field(min_length=1)
    project: dict[str, Any] | None = None
