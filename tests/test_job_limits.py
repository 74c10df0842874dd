"""Cancel and limits of project jobs, against a real Label Studio 1.23.2 (and a real redis-server for jobs
on RQ), the LLM being the fake server: a cancel stops new calls at once and abandons those in flight; a
live job whose calls take longer than its heartbeat (JOB_HEARTBEAT) is never shown as interrupted; caps on one job's
concurrency and on the jobs running at once; a job whose parts Redis lost ends as failed with the
reason; DELETE of an ended job answers 409."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import JOB_GAZETTEER, job_auth, job_texts
from tests.processes import wait_until
from tests.test_prelabel_job import prelabel
from tests.test_rq_jobs import rq_backend, rq_env, start_job

pytestmark = pytest.mark.label_studio


def job_backend(backend_factory, label_studio, **env):
    return backend_factory(workers=1, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token,
                           LLM_TIMEOUT="300", **env)


def test_a_live_job_is_never_shown_interrupted_and_a_cancel_abandons_its_calls_in_flight(
    label_studio, backend_factory, connected_project, llm
):
    # 8 jobs at --concurrency 256 then DELETE: 1,863 more paid calls over ~4 min, and live jobs shown as
    # "interrupted" meanwhile. Here each call would take 5 minutes: the job makes no progress for longer
    # than JOB_HEARTBEAT (10 s here, 60 s by default: what is proven is the same), then is cancelled
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.latency = 300.0
    heartbeat = 10.0
    backend = job_backend(backend_factory, label_studio, JOB_HEARTBEAT=str(heartbeat))
    project = connected_project(job_texts(40), title="cancel in flight", backend=backend)
    started = httpx.post(backend.url + "/jobs", json={"project": project.id, "concurrency": 4}, headers=job_auth(backend), timeout=60)
    assert started.status_code == 202, started.text
    job = started.json()
    assert wait_until(lambda: llm.in_flight == 4, timeout=60)
    since = time.monotonic()
    states = set()
    while time.monotonic() - since < 2 * heartbeat:  # longer than a dead job's heartbeat may be stale
        states |= {j["state"] for j in httpx.get(backend.url + "/jobs", timeout=30).json()["jobs"] if j["id"] == job["id"]}
        time.sleep(2)
    assert states == {"running"}
    assert len(llm.requests) == 4
    assert httpx.delete(f"{backend.url}/jobs/{job['id']}", headers=job_auth(backend), timeout=30).status_code == 202
    final = wait_until(lambda: (j := httpx.get(f"{backend.url}/jobs/{job['id']}", timeout=30).json())["state"] != "running" and j,
                       timeout=60)
    assert final and (final["state"], final["done"], final["failed"]) == ("cancelled", 0, 0), final
    # the 4 calls were abandoned (the fake saw the client leave, 5 minutes early) and none started after
    assert wait_until(lambda: len(llm.disconnects) == 4, timeout=30)
    assert len(llm.requests) == 4 and llm.reply_times == []
    again = httpx.delete(f"{backend.url}/jobs/{job['id']}", headers=job_auth(backend), timeout=30)
    assert again.status_code == 409 and "cancelled" in again.json()["error"]


def test_one_jobs_concurrency_and_the_jobs_running_at_once_are_capped_with_clear_refusals(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.latency = 300.0
    model_dir = tmp_path / "model"  # the backend's and the CLI's store: the cap counts the jobs of both
    backend = job_backend(backend_factory, label_studio, model_dir=model_dir, JOBS_MAX_RUNNING="1", JOB_MAX_CONCURRENCY="16")
    first = connected_project(job_texts(10), title="cap one", backend=backend)
    second = connected_project(job_texts(10), title="cap two", backend=backend)
    greedy = httpx.post(backend.url + "/jobs", json={"project": first.id, "concurrency": 17}, headers=job_auth(backend), timeout=60)
    assert greedy.status_code == 400 and "concurrency" in greedy.json()["error"] and "JOB_MAX_CONCURRENCY" in greedy.json()["error"]
    running = httpx.post(backend.url + "/jobs", json={"project": first.id, "concurrency": 2}, headers=job_auth(backend), timeout=60)
    assert running.status_code == 202, running.text
    job = running.json()
    refused = httpx.post(backend.url + "/jobs", json={"project": second.id}, headers=job_auth(backend), timeout=60)
    assert refused.status_code == 429 and job["id"] in refused.json()["error"] and "JOBS_MAX_RUNNING" in refused.json()["error"]
    cli_refused = prelabel(llm, model_dir, label_studio, "--project", str(second.id), "--yes", JOBS_MAX_RUNNING="1")
    assert cli_refused.returncode == 1 and job["id"] in cli_refused.stderr and "Traceback" not in cli_refused.stderr
    too_many = prelabel(llm, model_dir, label_studio, "--project", str(second.id), "--yes", "--concurrency", "100",
                        JOB_MAX_CONCURRENCY="16")
    assert too_many.returncode != 0 and "--concurrency" in too_many.stderr and "Traceback" not in too_many.stderr
    assert httpx.delete(f"{backend.url}/jobs/{job['id']}", headers=job_auth(backend), timeout=30).status_code == 202
    assert wait_until(lambda: httpx.get(f"{backend.url}/jobs/{job['id']}", timeout=30).json()["state"] == "cancelled", timeout=60)
    llm.latency = 0.0
    after = httpx.post(backend.url + "/jobs", json={"project": second.id}, headers=job_auth(backend), timeout=60)
    assert after.status_code == 202, after.text


def test_a_job_whose_parts_redis_lost_ends_as_failed_with_the_reason(
    label_studio, backend_factory, connected_project, llm, redis_url, redis_server, tmp_path
):
    # a Redis restarted without persistence left its job "running" for ever, and DELETE had no effect
    llm.gazetteer = dict(JOB_GAZETTEER)
    env = rq_env(llm, {"MODEL_DIR": str(tmp_path / "model")}, label_studio, redis_url)
    backend = rq_backend(backend_factory, env, workers=1)
    project = connected_project(job_texts(60), title="redis lost", backend=backend)
    job = start_job(backend, project)  # no worker runs: its 3 parts wait on the queue

    def current() -> dict:
        return httpx.get(f"{backend.url}/jobs/{job['id']}", timeout=30).json()

    assert wait_until(lambda: current()["seen"] == 60, timeout=60)
    assert current()["state"] == "running"
    redis_server.client().flushall()  # what a restart without persistence leaves
    final = current()
    assert (final["state"], final["failed"]) == ("failed", 60), final
    assert "vanished from Redis" in final["message"]
    assert [j["state"] for j in httpx.get(backend.url + "/jobs", timeout=30).json()["jobs"] if j["id"] == job["id"]] == ["failed"]
    gone = httpx.delete(f"{backend.url}/jobs/{job['id']}", headers=job_auth(backend), timeout=30)
    assert gone.status_code == 409 and "failed" in gone.json()["error"]
    assert llm.requests == []
