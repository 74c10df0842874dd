"""Import CoNLL files into a Label Studio project through the SDK client.

Everything that can be wrong (the files, the project's labels) is checked before the first task is
sent. Tasks go in batches behind a progress bar. Each task's data carries `conll_key`, a hash of
(file name, document/sentence position, text): a re-run lists the project's tasks and skips the
keys already there, so importing the same file twice adds nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from tqdm import tqdm

from backend.infra.errors import BackendError
from backend.infra.masking import shortened
from backend.ner.labelconfig import NerTarget, parse_label_config
from backend.pipeline.prelabel import span_results
from backend.spans.alignment import Span
from backend.tools.conll import Unit, build_units, labels_of, read_files

GOLD_MODES = ("annotations", "predictions", "none")
GOLD_MODEL_VERSION = "gold"
KEY_FIELD = "conll_key"
SOURCE_FIELD = "conll_source"
# Label Studio's default palette order, so generated projects look like hand-made ones
COLORS = ("#FF0000", "#0000FF", "#00AA00", "#FFA500", "#800080", "#008080", "#A52A2A", "#FF00FF", "#808000", "#000080")


class ImportRefused(BackendError):
    """The import cannot go ahead; nothing was imported."""


class LabelStudioError(BackendError):
    """Label Studio refused a call or could not be reached; the message never holds the API key."""


def connect(url: str, api_key: str) -> Any:
    """The SDK client; `api_key` is a personal access token or a legacy token."""
    from backend.pipeline.delivery import label_studio_client

    if not url.startswith(("http://", "https://")):
        raise LabelStudioError(f"--label-studio-url must start with http:// or https:// (got {url!r})")
    if not api_key:
        raise LabelStudioError("--api-key is empty (or set LABEL_STUDIO_API_KEY)")
    return label_studio_client(url.rstrip("/"), api_key, timeout=120)


def _detail(body: Any) -> str:
    if isinstance(body, dict):
        # "Validation error" alone says nothing: what failed is in validation_errors
        if body.get("validation_errors"):
            return shortened(f"{body.get('detail') or 'invalid'}: {body['validation_errors']}", 300)
        for key in ("detail", "message", "error"):
            if body.get(key):
                return shortened(str(body[key]), 300)
    return shortened(str(body), 300) if body else ""


@contextmanager
def sdk_errors(what: str) -> Iterator[None]:
    """Turn the SDK's and httpx's exceptions into one line saying what failed."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except ApiError as error:
        hint = {401: " (check --api-key)", 403: " (check --api-key)", 404: " (check the project id and --label-studio-url)"}
        detail = _detail(error.body)
        raise LabelStudioError(
            f"{what}: Label Studio answered HTTP {error.status_code}{hint.get(error.status_code or 0, '')}"
            + (f": {detail}" if detail else "")
        ) from None
    except httpx.HTTPError as error:
        raise LabelStudioError(f"{what}: cannot reach Label Studio ({type(error).__name__})") from None


@dataclass
class ImportSummary:
    project_id: int
    created_project: bool
    units: int
    imported: int
    skipped_existing: int
    entities: int  # gold entities sent with the imported tasks

    def describe(self) -> str:
        made = "created project" if self.created_project else "project"
        return (
            f"{made} {self.project_id}: imported {self.imported} tasks"
            f" ({self.entities} gold entities), skipped {self.skipped_existing} already in the project"
        )


def label_config_for(labels: Iterable[str], data_key: str = "text") -> str:
    """A Label Studio NER config with one `<Label>` per tag type of the file."""
    items = "\n".join(
        f"    <Label value={quoteattr(label)} background={quoteattr(COLORS[i % len(COLORS)])}/>"
        for i, label in enumerate(labels)
    )
    return (
        '<View>\n  <Labels name="label" toName="text">\n'
        f"{items}\n  </Labels>\n"
        f'  <Text name="text" value="${data_key}"/>\n</View>'
    )


def task_data(unit: Unit, target: NerTarget) -> dict[str, Any]:
    """The task's data as both import-conll and predict-conll build it."""
    return {target.data_key: unit.text, KEY_FIELD: unit.key, SOURCE_FIELD: unit.name}


def gold_results(unit: Unit, target: NerTarget) -> list[dict[str, Any]]:
    return span_results(target, [Span(e.start, e.end, e.text, e.label) for e in unit.entities])


def task_payload(unit: Unit, target: NerTarget, gold: str) -> dict[str, Any]:
    task: dict[str, Any] = {"data": task_data(unit, target)}
    if gold == "annotations":
        task["annotations"] = [{"result": gold_results(unit, target), "ground_truth": True}]
    elif gold == "predictions":
        task["predictions"] = [{"result": gold_results(unit, target), "model_version": GOLD_MODEL_VERSION, "score": 1.0}]
    return task


def target_of(label_config: str) -> NerTarget:
    """The `<Labels>` → `<Text>` pair CoNLL entities go to: the first one of the config."""
    return parse_label_config(label_config).targets[0]


def check_labels(target: NerTarget, labels: Sequence[str], project_id: int) -> None:
    missing = [label for label in labels if label not in target.label_names]
    if missing:
        raise ImportRefused(
            f"project {project_id}'s label config lacks the file's labels {', '.join(missing)}"
            f" (<Labels name=\"{target.from_name}\"> has {', '.join(target.label_names) or 'none'});"
            " add them to the config, or use --create"
        )


def existing_keys(client: Any, project_id: int) -> set[str]:
    keys = set()
    for task in client.tasks.list(project=project_id, fields="task_only", page_size=500):
        key = (task.data or {}).get(KEY_FIELD)
        if key:
            keys.add(key)
    return keys


def _project_by_title(client: Any, title: str) -> Any | None:
    for project in client.projects.list(title=title):
        if project.title == title:
            return project
    return None


def import_conll(
    client: Any,
    paths: Sequence[str | Path],
    *,
    project_id: int | None = None,
    create_title: str | None = None,
    per: str = "document",
    join: str = "auto",
    gold: str = "annotations",
    batch_size: int = 100,
    progress: bool = True,
    limit: int | None = None,
) -> ImportSummary:
    """`limit`: the files' first N tasks (documents or sentences, in file order) only; a re-run with a
    larger N adds the next ones."""
    if (project_id is None) == (create_title is None):
        raise ImportRefused("give exactly one of --project ID and --create TITLE")
    if gold not in GOLD_MODES:
        raise ImportRefused(f"--gold must be one of {', '.join(GOLD_MODES)}")
    if batch_size < 1:
        raise ImportRefused("--batch-size must be at least 1")
    documents = read_files(paths)  # a malformed file stops everything here
    labels = labels_of(documents)
    units = build_units(documents, per=per, join=join)[:limit]

    with sdk_errors("import"):
        return _import(client, units, labels, project_id, create_title, gold, batch_size, progress)


def _import(
    client: Any, units: list[Unit], labels: list[str], project_id: int | None, create_title: str | None,
    gold: str, batch_size: int, progress: bool,
) -> ImportSummary:
    created = False
    if create_title is not None:
        same = _project_by_title(client, create_title)
        if same is not None:
            # re-running a --create import must not make a second project with the same tasks
            raise ImportRefused(f"a project titled {create_title!r} exists (id {same.id}): use --project {same.id}")
        if not labels:
            raise ImportRefused("the files have no entity tags to build a label config from; use --project")
        project = client.projects.create(title=create_title, label_config=label_config_for(labels))
        project_id, created = project.id, True
        target = target_of(project.label_config or label_config_for(labels))
        known: set[str] = set()
    else:
        project = client.projects.get(id=project_id)
        target = target_of(project.label_config or "")
        check_labels(target, labels, project_id)
        known = existing_keys(client, project_id)

    fresh: list[Unit] = []
    for unit in units:
        if unit.key not in known:
            fresh.append(unit)
            known.add(unit.key)  # the same file given twice is imported once
    bar = tqdm(total=len(fresh), unit="task", desc="importing", file=sys.stderr, disable=not progress or not fresh)
    try:
        for start in range(0, len(fresh), batch_size):
            batch = fresh[start:start + batch_size]
            client.projects.import_tasks(id=project_id, request=[task_payload(u, target, gold) for u in batch])
            bar.update(len(batch))
    finally:
        bar.close()
    return ImportSummary(
        project_id=project_id,
        created_project=created,
        units=len(units),
        imported=len(fresh),
        skipped_existing=len(units) - len(fresh),
        entities=sum(len(u.entities) for u in fresh) if gold != "none" else 0,
    )
