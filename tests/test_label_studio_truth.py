"""Label Studio holds the truth about what was delivered (pipeline/delivery.py), against a real Label
Studio 1.23: writes are made once even when their answer is lost (a proxy of the tests' own answers
504 after Label Studio stored them), a task whose prediction is gone from Label Studio is pre-labeled
again by the next job, Retrieve Predictions or opening, and a job's report counts what Label Studio
holds. The LLM is the fake server."""

from __future__ import annotations

import subprocess
import threading

import httpx
import pytest

from backend.infra.storage import Database
from backend.pipeline.delivery import Deliveries
from tests.conftest import (
    JOB_GAZETTEER,
    NER_CONFIG,
    assert_exact,
    cli,
    job_auth,
    job_texts,
    predictions_by_task,
    predictions_written,
)
from tests.processes import backend_env, wait_until

pytestmark = pytest.mark.label_studio


def prelabel(llm, model_dir, url: str, token: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return cli("prelabel", *args, "--yes", "--quiet", env=backend_env(
        llm.base_url, model_dir, LABEL_STUDIO_URL=url, LABEL_STUDIO_API_KEY=token, LLM_RETRY_BASE="0.01", **env))


def versions(project) -> dict[int, list[str]]:
    """task id -> the model_version of each prediction Label Studio holds for it (read with predictions.list,
    which never makes Label Studio call /predict)."""
    return {task_id: [p.model_version for p in held] for task_id, held in predictions_by_task(project).items()}


def test_a_write_whose_answer_is_lost_is_read_back_not_repeated_one_prediction_per_task(
    label_studio, connected_project, ls_proxy, llm, tmp_path
):
    # Label Studio stores every import; the proxy answers each with a 504. The SDK once retried the POST
    # itself (twice on a 5xx): three predictions per task, and a job reporting failure or success at random.
    llm.gazetteer = dict(JOB_GAZETTEER)
    project = connected_project(job_texts(40), title="lost answers", connect=False)
    ls_proxy.swallow_prediction_imports()
    done = prelabel(llm, tmp_path / "model", ls_proxy.url, label_studio.token, "--project", str(project.id))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "40 pre-labeled, 0 failed, 0 skipped of 40 read" in done.stdout  # written and read back
    assert ls_proxy.swallowed and all(status == 201 for _, _, status in ls_proxy.swallowed)
    assert ls_proxy.imports() == len(ls_proxy.swallowed)  # each import sent once: no retry behind the job's back
    (version,) = {v for vs in versions(project).values() for v in vs}
    assert_exact(project, version)


def test_a_dropped_write_then_an_immediate_re_run_writes_the_rest_at_once_and_reports_what_label_studio_holds(
    label_studio, connected_project, ls_proxy, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    model_dir = tmp_path / "model"
    project = connected_project(job_texts(30), title="dropped", connect=False)
    ls_proxy.swallow_prediction_imports(times=1)
    first = prelabel(llm, model_dir, ls_proxy.url, label_studio.token, "--project", str(project.id))
    assert first.returncode == 0, first.stdout + first.stderr
    written = predictions_written(project)
    assert f"{written} pre-labeled, 0 failed" in first.stdout
    # Label Studio loses some predictions (a user deletes them): the store still says they were delivered
    for task in project.tasks()[:10]:
        for prediction in project.predictions(task.id):
            project.ls.predictions.delete(id=prediction.id)
    again = prelabel(llm, model_dir, ls_proxy.url, label_studio.token, "--project", str(project.id))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "10 pre-labeled, 0 failed, 20 skipped of 30 read" in again.stdout
    assert_exact(project, versions(project)[project.tasks()[-1].id][0])


def test_after_delete_predictions_the_next_job_and_the_next_opening_pre_label_again(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    model_dir = tmp_path / "model"
    backend = backend_factory(workers=1, model_dir=model_dir,
                              LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token)
    project = connected_project(job_texts(12), title="deleted", backend=backend)
    version = project.model_version()
    first = prelabel(llm, model_dir, label_studio.url, label_studio.token, "--project", str(project.id))
    assert "12 pre-labeled, 0 failed" in first.stdout, first.stdout + first.stderr
    # the Data Manager's "Delete predictions" on every task
    response = label_studio.api("POST", f"/api/dm/actions?id=delete_tasks_predictions&project={project.id}",
                                json={"selectedItems": {"all": True, "excluded": []}})
    assert response.status_code == 200, response.text
    assert predictions_written(project) == 0
    opened = project.open_next_task()  # Label Studio asks /predict: answered, not [] for a task "delivered" once
    assert versions(project)[opened["id"]] == [version]
    second = prelabel(llm, model_dir, label_studio.url, label_studio.token, "--project", str(project.id))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "11 pre-labeled, 0 failed, 1 skipped of 12 read" in second.stdout
    assert_exact(project, version)
    assert len(llm.requests) == 12  # every answer came from the cache the second time


def test_a_predict_whose_caller_gave_up_is_answered_again_by_the_next_retrieve_predictions(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    backend = backend_factory(workers=1, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token)
    project = connected_project(job_texts(6), title="gave up", backend=backend)
    version = project.model_version()
    tasks = project.tasks()
    # a /predict whose answer Label Studio never stored (its caller timed out and went away)
    answer = httpx.post(backend.url + "/predict", json={
        "tasks": [{"id": t.id, "data": t.data} for t in tasks], "project": f"{project.id}.1700000000", "label_config": NER_CONFIG,
    }, timeout=120)
    assert answer.status_code == 200 and all(r != [] for r in answer.json()["results"]), answer.text
    assert predictions_written(project) == 0
    label_studio.retrieve_predictions(project.id)
    assert all(v == [version] for v in versions(project).values())
    assert_exact(project, version)


def test_a_second_job_on_a_project_is_refused_with_the_first_ones_id_over_http_and_from_the_command_line(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    gate = threading.Event()  # the first job's LLM calls wait here: it runs for as long as the test needs
    llm.responder = lambda body: gate.wait(300) and llm.gazetteer_reply(body)
    model_dir = tmp_path / "model"
    backend = backend_factory(workers=2, model_dir=model_dir,
                              LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token)
    project = connected_project(job_texts(40), title="two jobs", backend=backend)
    first = httpx.post(backend.url + "/jobs", headers=job_auth(backend), json={"project": project.id, "concurrency": 2}, timeout=60)
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    # the other gunicorn worker, then the command line, share the store: both are refused
    refused = [httpx.post(backend.url + "/jobs", headers=job_auth(backend), json={"project": project.id}, timeout=60) for _ in range(3)]
    assert {r.status_code for r in refused} == {409} and {r.json()["job"] for r in refused} == {job_id}, [r.text for r in refused]
    by_cli = prelabel(llm, model_dir, label_studio.url, label_studio.token, "--project", str(project.id))
    assert by_cli.returncode != 0 and job_id in by_cli.stdout + by_cli.stderr and "Traceback" not in by_cli.stderr
    gate.set()
    ended = wait_until(lambda: (j := httpx.get(f"{backend.url}/jobs/{job_id}", timeout=30).json())["state"] != "running" and j,
                       timeout=300, interval=0.5)
    assert ended and ended["state"] == "done" and ended["done"] == 40, ended
    jobs = httpx.get(backend.url + "/jobs", timeout=30).json()["jobs"]
    assert [j["id"] for j in jobs if j["project"] == project.id] == [job_id]
    assert predictions_written(project) == 40


def test_a_task_another_writer_holds_is_reported_pending_with_its_holder_not_done(
    label_studio, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    model_dir = tmp_path / "model"
    project = connected_project(job_texts(8), title="pending", connect=False)
    held = project.tasks()[3].id
    dry = prelabel(llm, model_dir, label_studio.url, label_studio.token, "--project", str(project.id), "--dry-run")
    version = dry.stdout.split("model version ", 1)[1].split()[0]
    # a writer (another job, say) claimed one task and is writing it now
    assert Deliveries(Database.in_dir(model_dir)).claim(str(project.id), version, [held], owner="job-0123456789ab") == {held}
    done = prelabel(llm, model_dir, label_studio.url, label_studio.token, "--project", str(project.id))
    assert "7 pre-labeled, 0 failed, 1 pending, 0 skipped of 8 read" in done.stdout, done.stdout + done.stderr
    assert f"task {held}: pending, being written by job 0123456789ab" in done.stdout
    assert project.predictions(held) == [] and predictions_written(project) == 7


def test_concurrent_writers_of_the_same_tasks_leave_one_prediction_each(label_studio, connected_project, tmp_path):
    from backend.pipeline.delivery import Delivery, import_predictions, label_studio_client
    from tests.conftest import span

    project = connected_project(job_texts(20), title="racing", connect=False)
    tasks = project.tasks()
    deliveries = Deliveries(Database.in_dir(tmp_path))
    items = [Delivery(str(project.id), t.id, "v1", [span(t.data["text"], "Note", "MISC")], None) for t in tasks]
    outcomes = []

    def write(owner: str) -> None:
        outcomes.append(import_predictions(label_studio_client(label_studio.url, label_studio.token), deliveries, items, owner=owner))

    threads = [threading.Thread(target=write, args=(f"job-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(v == ["v1"] for v in versions(project).values())
    assert sum(len(o.delivered) for o in outcomes) == 20


def test_a_write_label_studio_refuses_for_one_deleted_task_writes_every_other_task_and_fails_that_one(
    label_studio, connected_project, tmp_path
):
    """Label Studio 1.23.2 refuses a whole import_predictions call with a 400 ("Validation error", the
    item "contains invalid "task" field: corresponding task ID couldn't be retrieved") when one of its
    tasks was deleted, storing none of it: one task deleted mid-job failed the whole job."""
    from backend.pipeline.delivery import Delivery, import_predictions, label_studio_client
    from tests.conftest import span

    project = connected_project(job_texts(9), title="one deleted", connect=False)
    tasks = project.tasks()  # read before the delete, as a job's reader does
    gone = tasks[5].id
    project.ls.tasks.delete(id=gone)
    deliveries = Deliveries(Database.in_dir(tmp_path))
    items = [Delivery(str(project.id), t.id, "v1", [span(t.data["text"], "Note", "MISC")], None) for t in tasks]
    written = import_predictions(label_studio_client(label_studio.url, label_studio.token), deliveries, items, owner="job-1")
    assert written.delivered == {t.id for t in tasks} - {gone}, written
    assert list(written.failed) == [gone] and "HTTP 400 from Label Studio" in written.failed[gone], written.failed
    assert "couldn't be retrieved" in written.failed[gone], written.failed
    assert versions(project) == {t.id: ["v1"] for t in tasks if t.id != gone}
    assert deliveries.holders(str(project.id), "v1", [gone]) == {}  # its claim released: nothing is held for it


def test_a_task_deleted_while_its_job_runs_fails_alone_and_the_job_writes_the_rest(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    gate = threading.Event()  # the job's LLM calls wait here until the task is deleted
    llm.responder = lambda body: gate.wait(300) and llm.gazetteer_reply(body)
    backend = backend_factory(workers=1, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token)
    project = connected_project(job_texts(8), title="deleted mid-job", backend=backend)
    started = httpx.post(backend.url + "/jobs", headers=job_auth(backend), json={"project": project.id, "concurrency": 2},
                         timeout=60)
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    # a call under way: the job has read the project's tasks (one page), none written yet
    assert wait_until(lambda: len(llm.requests) >= 1, timeout=120)
    gone = project.tasks()[2].id
    project.ls.tasks.delete(id=gone)
    gate.set()
    ended = wait_until(lambda: (j := httpx.get(f"{backend.url}/jobs/{job_id}", timeout=30).json())["state"] != "running" and j,
                       timeout=300, interval=0.5)
    assert ended and ended["state"] == "done" and ended["done"] == 7 and ended["failed"] == 1, ended
    (failure,) = ended["failures"]
    assert failure["task"] == gone and "couldn't be retrieved" in failure["reason"], failure
    assert predictions_written(project) == 7


def test_a_task_label_studio_stored_a_predict_answer_for_after_the_job_listed_it_is_not_written_again(
    label_studio, connected_project, tmp_path
):
    # an annotator opens a task while a job runs: Label Studio stores the /predict answer (as the SDK's
    # predictions.create does here) after the job listed the task as unpredicted; the job's write skips it
    from backend.pipeline.delivery import Delivery, import_predictions, label_studio_client
    from tests.conftest import span

    project = connected_project(job_texts(6), title="opened meanwhile", connect=False)
    tasks = project.tasks()
    opened = tasks[2]
    project.ls.predictions.create(task=opened.id, result=[span(opened.data["text"], "Note", "MISC")], model_version="v1")
    items = [Delivery(str(project.id), t.id, "v1", [span(t.data["text"], "Note", "MISC")], None) for t in tasks]
    written = import_predictions(label_studio_client(label_studio.url, label_studio.token), Deliveries(Database.in_dir(tmp_path)), items,
                                 owner="job-0123456789ab")
    assert written.present == {opened.id} and written.delivered == {t.id for t in tasks} - {opened.id}
    assert versions(project) == {t.id: ["v1"] for t in tasks}
