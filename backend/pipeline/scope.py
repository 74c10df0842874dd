"""Which tasks of a project a job pre-labels: its scope. Kept free of heavy imports: the command
line's parser reads it, and prometheus_client must not be imported before `llm-ner serve` chooses
its multiprocess mode."""

from __future__ import annotations

from typing import Any

SCOPES = ("missing", "unannotated", "stale", "all")
SCOPE_HELP = {
    "missing": "tasks with no prediction at all (what opening a task would ask for)",
    "unannotated": "tasks with no annotation and no prediction of the current model_version",
    "stale": "tasks with no annotation whose newest prediction is of an older model_version",
    "all": "every task without a prediction of the current model_version, annotated or not",
}


# What a job lists of each task when its scope allows (Label Studio's `include`): the model_versions of
# a task's predictions as one comma-joined string instead of every prediction and annotation with its
# result. Measured on Label Studio 1.23.2: 0.6 ms and 160 bytes a task instead of 3 ms and 960 bytes.
LISTED_FIELDS = "id,data,total_predictions,total_annotations,predictions_model_versions"


def field_of(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def listed_fields(scope: str, version: str) -> str | None:
    """The `include` of a job's task listing; None: every field. `stale` needs each prediction's date,
    and a version with a comma could not be told apart in the joined string."""
    return None if scope == "stale" or "," in version else LISTED_FIELDS


def prediction_versions(task: Any) -> list[str]:
    predictions = field_of(task, "predictions")
    if predictions is not None:
        return [field_of(p, "model_version") for p in predictions]
    return [v for v in (field_of(task, "predictions_model_versions") or "").split(",") if v]


def wanted(task: Any, version: str, scope: str) -> bool:
    """Whether a task (as the SDK lists it with fields="all", whole or with LISTED_FIELDS) is in the job's scope."""
    predictions = field_of(task, "predictions") or []
    if version in prediction_versions(task):
        return False  # never a second prediction of one version
    annotated = bool(field_of(task, "total_annotations") or [
        a for a in field_of(task, "annotations") or [] if not field_of(a, "was_cancelled", False)
    ])
    if scope == "missing":
        return not predictions and not field_of(task, "total_predictions")
    if scope == "unannotated":
        return not annotated
    if scope == "stale":
        if annotated or not predictions:
            return False
        newest = max(predictions, key=lambda p: (str(field_of(p, "created_at") or ""), field_of(p, "id") or 0))
        return field_of(newest, "model_version") != version
    return True  # all
