"""Pre-labeling a whole project (`llm-ner prelabel`, `POST /jobs`) against a real Label Studio 1.23,
the LLM being the fake server: exact predictions, one per task and version, resumable after kill -9,
cancellable, `--scope stale` after a correction, failures reported and never written empty."""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import signal
import subprocess
import sys

import httpx
import pytest

from tests.conftest import (
    JOB_GAZETTEER,
    assert_exact,
    cli,
    figures,
    job_auth,
    job_texts,
    ls_args,
    predictions_by_task,
    predictions_written,
    span,
)
from tests.fake_llm import Reply
from tests.processes import REPO, backend_env, wait_until

pytestmark = pytest.mark.label_studio


def job_env(llm, model_dir, label_studio, **extra) -> dict[str, str]:
    return backend_env(llm.base_url, model_dir, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token,
                       LLM_RETRY_BASE="0.01", **extra)


def prelabel(llm, model_dir, label_studio, *args, **env) -> subprocess.CompletedProcess:
    return cli("prelabel", *args, "--quiet", env=job_env(llm, model_dir, label_studio, **env))




def test_a_job_pre_labels_every_task_once_with_the_backends_version_and_opening_a_task_asks_nothing(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    model_dir = tmp_path / "model"
    backend = backend_factory(workers=1, model_dir=model_dir)
    project = connected_project(job_texts(120), title="job", backend=backend)
    done = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "120 pre-labeled, 0 failed, 0 skipped of 120 read" in done.stdout
    assert len(llm.requests) == 120
    assert_exact(project, project.model_version())
    opened = project.open_next_task()  # holds a prediction of the current version: Label Studio asks nothing
    assert len(project.predictions(opened["id"])) == 1 and len(llm.requests) == 120
    again = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--yes")
    assert "0 pre-labeled, 0 failed, 120 skipped of 120 read" in again.stdout and len(llm.requests) == 120


def test_concurrency_option_keeps_that_many_calls_in_flight_beyond_the_clients_default(
    label_studio, connected_project, llm, tmp_path
):
    # the LLM client lets 8 calls through without PREDICT_CONCURRENCY: --concurrency 12 must raise that
    # too (it once sized only the job's threads, and a job asked for 16 ran 8 at a time, 2x the ideal)
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.latency = 0.3
    project = connected_project(job_texts(48), title="concurrency", connect=False)
    done = prelabel(llm, tmp_path / "model", label_studio, "--project", str(project.id), "--yes", "--concurrency", "12")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(llm.requests) == 48 and llm.peak_in_flight == 12


def test_kill_9_mid_job_then_run_again_continues_without_duplicates_or_paying_twice(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.latency = 0.1
    model_dir = tmp_path / "model"
    project = connected_project(job_texts(200), title="resume", backend=backend_factory(workers=1, model_dir=model_dir))
    args = [sys.executable, "-m", "backend", "prelabel", "--project", str(project.id), "--yes", "--quiet", "--concurrency", "4",
            *ls_args(label_studio)]
    proc = subprocess.Popen(args, cwd=REPO, env=job_env(llm, model_dir, label_studio), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: predictions_written(project) >= 50, timeout=120, interval=0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    calls_before = len(llm.requests)
    assert calls_before < 200
    done = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_exact(project, project.model_version())
    # every text asked once, but for the few in flight at the kill (answered, not yet cached)
    assert 200 <= len(llm.requests) <= 200 + 4  # the calls in flight at the kill, no more


def test_a_job_killed_mid_way_pays_again_only_for_the_calls_in_flight_at_the_kill(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    # answers reached the shared cache only every WRITE_EVERY (2 s) or 32 answers: a kill -9 paid again
    # for what had finished since (271 calls for 240 tasks). The fake answers 20 calls, then holds every
    # call until the client hangs up: at the kill, 20 answers are finished and `concurrency` in flight.
    llm.gazetteer = dict(JOB_GAZETTEER)
    answered, concurrency, tasks = 20, 4, 100
    calls = itertools.count()
    llm.responder = lambda body: dataclasses.replace(llm.gazetteer_reply(body), delay=600.0 if next(calls) >= answered else 0.0)
    model_dir = tmp_path / "model"
    project = connected_project(job_texts(tasks), title="kill in flight", backend=backend_factory(workers=1, model_dir=model_dir))
    args = [sys.executable, "-m", "backend", "prelabel", "--project", str(project.id), "--yes", "--quiet",
            "--concurrency", str(concurrency), *ls_args(label_studio)]
    proc = subprocess.Popen(args, cwd=REPO, env=job_env(llm, model_dir, label_studio), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: len(llm.requests) >= answered + concurrency, timeout=120, interval=0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(llm.requests) == answered + concurrency  # the calls held: nothing more was sent
    llm.responder = None
    done = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    # the answered calls came from the cache; only those in flight at the kill were paid twice
    assert len(llm.requests) == tasks + concurrency, len(llm.requests)
    assert_exact(project, project.model_version())


def test_a_failing_task_is_reported_with_its_reason_and_never_written_empty(
    label_studio, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.responder = lambda body: Reply(status=500) if "poison" in body["messages"][-1]["content"] else llm.gazetteer_reply(body)
    model_dir = tmp_path / "model"
    project = connected_project(["Ada Lovelace in Oslo.", "poison pill", "Royal Society."], title="failing", connect=False)
    done = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--yes", LLM_MAX_RETRIES="0")
    assert done.returncode == 1
    poisoned = project.tasks()[1]
    assert "2 pre-labeled, 1 failed" in done.stdout
    assert f"task {poisoned.id}: llm_server: HTTP 500" in done.stdout
    assert project.predictions(poisoned.id) == []


def test_dry_run_and_max_cost_send_nothing(label_studio, connected_project, llm, tmp_path):
    llm.gazetteer = dict(JOB_GAZETTEER)
    model_dir = tmp_path / "model"
    project = connected_project(job_texts(8), title="estimate", connect=False)  # the command alone: no backend needed
    dry = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--dry-run")
    assert dry.returncode == 0 and "texts           8" in dry.stdout and "LLM calls       8" in dry.stdout
    costly = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--max-cost", "0.000001",
                      LLM_PRICES='{"fake-model": [1000, 1000]}')
    assert costly.returncode == 1 and "above --max-cost" in costly.stderr and "Traceback" not in costly.stderr
    unconfirmed = prelabel(llm, model_dir, label_studio, "--project", str(project.id), LLM_PRICES='{"fake-model": [1000, 1000]}')
    assert unconfirmed.returncode == 1 and "--yes" in unconfirmed.stderr
    assert llm.requests == [] and all(p == [] for p in predictions_by_task(project).values())


TWO_TEXTS = """<View>
  <Labels name="label" toName="t1,t2">
    <Label value="PER"/><Label value="LOC"/><Label value="ORG"/>
  </Labels>
  <Text name="t1" value="$first"/>
  <Text name="t2" value="$second"/>
</View>"""


def test_a_labels_serving_two_texts_is_estimated_then_pre_labeled_on_both(label_studio, llm, tmp_path):
    # the estimate looked the prompt up by the <Labels> name, while the prelabeler files a shared
    # <Labels>'s prompts by name>toName: every prelabel that estimated first died with KeyError 'label'
    llm.gazetteer = dict(JOB_GAZETTEER)
    ls = label_studio.client()
    project = ls.projects.create(title="two texts", label_config=TWO_TEXTS)
    ls.projects.import_tasks(id=project.id, request=[{"first": f"Ada Lovelace in Oslo, {i}.", "second": f"Royal Society {i}."}
                                                     for i in range(3)])
    model_dir = tmp_path / "model"
    dry = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "texts           6" in dry.stdout and "LLM calls       6" in dry.stdout
    assert llm.requests == []
    done = prelabel(llm, model_dir, label_studio, "--project", str(project.id))  # estimates, then runs (no cost known)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 pre-labeled, 0 failed" in done.stdout and len(llm.requests) == 6
    for task in ls.tasks.list(project=project.id):
        [prediction] = ls.predictions.list(task=task.id)
        regions = {(r["to_name"], r["value"]["text"], r["value"]["labels"][0]) for r in prediction.result}
        assert regions == {("t1", "Ada Lovelace", "PER"), ("t1", "Oslo", "LOC"), ("t2", "Royal Society", "ORG")}


def test_the_estimate_of_a_big_project_comes_from_a_sample_and_states_its_error(
    label_studio, connected_project, llm, tmp_path
):
    # a dry run once read every task before printing anything (80 minutes at 10 million tasks, memory
    # growing per task): it reads ESTIMATE_SAMPLE tasks and scales them to the project's task count
    lengths = random.Random(7).choices(range(1, 12), k=600)
    texts = [f"Note {i}: " + "Ada Lovelace wrote to the Royal Society from Oslo. " * n for i, n in enumerate(lengths)]
    project = connected_project(texts, title="estimate sample", connect=False)
    model_dir = tmp_path / "model"
    prices = {"LLM_PRICES": '{"fake-model": [1, 1]}'}
    sampled = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--dry-run", ESTIMATE_SAMPLE="100", **prices)
    exact = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--dry-run", ESTIMATE_SAMPLE="1000", **prices)
    assert sampled.returncode == exact.returncode == 0, sampled.stderr + exact.stderr
    guess, truth = figures(sampled.stdout), figures(exact.stdout)
    assert guess["sample"].startswith("the first 100 of 600 tasks, extrapolated: ±"), sampled.stdout
    error = float(guess["sample"].split("±")[1].split("%")[0]) / 100
    assert 0 < error < 0.5 and "sample" not in truth
    assert guess["texts"] == truth["texts"] == "600" and guess["LLM calls"] == "600"
    for name in ("prompt tokens", "answer tokens"):
        estimated, counted = int(guess[name].split()[0]), int(truth[name].split()[0])
        assert abs(estimated - counted) <= error * counted, (name, estimated, counted, error)
    # within --limit, the estimate is exact
    limited = figures(prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--dry-run", "--limit", "40",
                               ESTIMATE_SAMPLE="100").stdout)
    assert limited["texts"] == "40" and "sample" not in limited
    # `llm-ner estimate --project` samples the same way
    env = job_env(llm, model_dir, label_studio, ESTIMATE_SAMPLE="100")
    alone = cli("estimate", "--project", str(project.id), "--url", label_studio.url, "--api-key", label_studio.token, env=env)
    assert alone.returncode == 0, alone.stderr
    assert figures(alone.stdout)["sample"].startswith("the first 100 of 600 tasks, extrapolated: ±")
    assert llm.requests == []


def test_scope_stale_re_pre_labels_unannotated_tasks_after_a_correction(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    model_dir = tmp_path / "model"
    # the correction changes model_version at once, not after VERSION_COALESCE_SECONDS (10 s by default;
    # test_trust tests the coalescing), in the backend and in the command alike
    at_once = {"VERSION_COALESCE_SECONDS": "0"}
    backend = backend_factory(workers=1, model_dir=model_dir, **at_once)
    project = connected_project(job_texts(6), title="stale", backend=backend)
    assert prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--yes", **at_once).returncode == 0
    old = project.model_version()
    first = project.tasks()[1]
    corrected = [span(first.data["text"], "Ada Lovelace", "PER")]  # the human keeps only the person
    project.ls.annotations.create(id=first.id, result=corrected)
    # Label Studio sends the webhook itself; the example changes the model_version
    assert wait_until(lambda: project.model_version() != old, timeout=30)
    new = project.model_version()
    done = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--scope", "stale", "--yes", **at_once)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 pre-labeled, 0 failed, 1 skipped of 6 read" in done.stdout
    for task in project.tasks():
        versions = sorted(p.model_version for p in project.predictions(task.id))
        assert versions == ([old] if task.id == first.id else sorted([old, new]))
    # these scopes list each task's prediction versions as Label Studio joins them, not every prediction
    again = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--scope", "unannotated", "--yes", **at_once)
    assert "0 pre-labeled, 0 failed, 6 skipped of 6 read" in again.stdout, again.stdout + again.stderr
    annotated_too = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--scope", "all", "--yes", **at_once)
    assert "1 pre-labeled, 0 failed, 5 skipped of 6 read" in annotated_too.stdout, annotated_too.stdout + annotated_too.stderr
    assert sorted(p.model_version for p in project.predictions(first.id)) == sorted([old, new])


def test_a_job_runs_inside_the_backend_over_http_with_progress_and_cancel(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.latency, llm.max_concurrency = 0.2, 2
    backend = backend_factory(workers=2, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token)
    project = connected_project(job_texts(150), title="http job", backend=backend)
    started = httpx.post(backend.url + "/jobs", headers=job_auth(backend), json={"project": project.id, "concurrency": 2}, timeout=60)
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["state"] == "running" and job["total"] == 150
    assert wait_until(lambda: httpx.get(f"{backend.url}/jobs/{job['id']}").json()["done"] >= 50, timeout=120)
    progress = httpx.get(f"{backend.url}/jobs/{job['id']}").json()  # any worker answers: the record is shared
    assert progress["tasks_per_second"] > 0 and progress["eta_seconds"] is not None and progress["prompt_tokens"] > 0
    assert httpx.delete(f"{backend.url}/jobs/{job['id']}", headers=job_auth(backend)).status_code == 202
    final = wait_until(lambda: (j := httpx.get(f"{backend.url}/jobs/{job['id']}").json())["state"] != "running" and j, timeout=60)
    assert final["state"] == "cancelled" and 50 <= final["done"] < 150
    assert predictions_written(project) == final["done"]
    assert httpx.get(backend.url + "/jobs").json()["jobs"][0]["id"] == job["id"]
    bad = httpx.post(backend.url + "/jobs", headers=job_auth(backend), json={"project": project.id, "scope": "everything"})
    assert bad.status_code == 400 and "scope" in bad.json()["error"]
    assert httpx.get(backend.url + "/jobs/nope").status_code == 404
