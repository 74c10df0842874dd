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


def field_of(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def wanted(task: Any, version: str, scope: str) -> bool:
    """Whether a task (as the SDK lists it with fields="all") is in the job's scope."""
    predictions = field_of(task, "predictions") or []
    versions = [field_of(p, "model_version") for p in predictions]
    if version in versions:
        return False  # never a second prediction of one version
    annotated = bool(field_of(task, "total_annotations") or [
        a for a in field_of(task, "annotations") or [] if not field_of(a, "was_cancelled", False)
    ])
    if scope == "missing":
        return not predictions
    if scope == "unannotated":
        return not annotated
    if scope == "stale":
        if annotated or not predictions:
            return False
        newest = max(predictions, key=lambda p: (str(field_of(p, "created_at") or ""), field_of(p, "id") or 0))
        return field_of(newest, "model_version") != version
    return True  # all
