"""Claims on (task, model_version) before a write into a real Label Studio 1.23 (pipeline/delivery.py):
a process killed between its claim and its write must not leave the task without pre-labels for good."""

from __future__ import annotations

import pytest

from backend.infra.storage import Database
from backend.pipeline.delivery import Deliveries, Delivery, import_predictions
from tests.conftest import span

pytestmark = pytest.mark.label_studio

TEXTS = ["Ada Lovelace wrote.", "Oslo is cold.", "The Royal Society met."]


def test_a_claim_left_unconfirmed_by_a_dead_process_is_taken_over_after_the_lease_and_never_written_twice(
    label_studio, connected_project, tmp_path
):
    project = connected_project(TEXTS, title="claims", connect=False)
    first, second, third = (t.id for t in project.tasks())
    pid = str(project.id)
    now = [1_000_000.0]
    deliveries = Deliveries(Database.in_dir(tmp_path), lease=30, clock=lambda: now[0])
    client = label_studio.client()
    # a process claimed the first two tasks and was killed: before its write of the first, and after
    # its write of the second but before confirming it
    assert deliveries.claim(pid, "v1", [first, second], owner="dead") == {first, second}
    client.projects.import_predictions(id=project.id, request=[{"task": second, "result": [], "model_version": "v1"}])
    items = [Delivery(pid, task, "v1", [span(text, text.split()[0], "MISC")], None) for task, text in zip((first, second, third), TEXTS)]

    # within the lease the dead process might still be writing: only the unclaimed task is written
    written = import_predictions(client, deliveries, items, owner="alive")
    assert (written.delivered, set(written.pending)) == ({third}, {first, second})
    assert [len(project.predictions(t)) for t in (first, second, third)] == [0, 1, 1]

    now[0] += 31  # past the lease (longer than a write's HTTP timeout): the holder can no longer be writing
    written = import_predictions(client, deliveries, items, owner="alive")
    assert (written.delivered, written.present) == ({first}, {second, third})  # Label Studio holds the second already
    assert [len(project.predictions(t)) for t in (first, second, third)] == [1, 1, 1]
    assert all(confirmed for _, confirmed, _ in deliveries.holders(pid, "v1", [first, second, third]).values())

    now[0] += 3600  # Label Studio holds every one: nothing is written again
    written = import_predictions(client, deliveries, items, owner="late")
    assert (written.delivered, written.present) == (set(), {first, second, third})
    assert [len(project.predictions(t)) for t in (first, second, third)] == [1, 1, 1]


def test_a_write_label_studio_refuses_releases_the_refused_claims_for_the_next_try(label_studio, connected_project, tmp_path):
    project = connected_project(TEXTS[:1], title="refused", connect=False)
    (task,) = (t.id for t in project.tasks())
    deliveries = Deliveries(Database.in_dir(tmp_path), lease=30)
    result = [span(TEXTS[0], "Ada Lovelace", "PER")]
    missing = task + 10_000_000  # no such task: Label Studio refuses the whole write, which is split down to it
    written = import_predictions(label_studio.client(), deliveries, [Delivery(str(project.id), t, "v1", result, None) for t in (task, missing)])
    assert written.delivered == {task} and set(written.failed) == {missing}
    assert "HTTP 400" in written.failed[missing]
    assert set(deliveries.holders(str(project.id), "v1", [task, missing])) == {task}  # the refused claim is released
    again = import_predictions(label_studio.client(), deliveries, [Delivery(str(project.id), task, "v1", result, None)])
    assert again.present == {task} and again.delivered == set()
    assert len(project.predictions(task)) == 1
