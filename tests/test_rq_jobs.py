"""Project jobs on RQ (REDIS_URL) against a real redis-server, a real Label Studio 1.23 and the fake LLM
over HTTP: a job split into parts across two `llm-ner worker` processes, a worker killed mid-part,
a cancel that stops every worker's parts, and LLM_RPM shared by two processes.

The multi-worker tests run once per store engine (`database_url`): SQLite in one MODEL_DIR shared by
every process (one host), and PostgreSQL (as several hosts would share it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from redis import Redis
from rq import Queue, Worker
from rq.registry import StartedJobRegistry

from tests.conftest import (
    JOB_GAZETTEER,
    NER_CONFIG,
    assert_exact,
    cli,
    cli_on_fake,
    job_auth,
    job_texts,
    ls_args,
    predictions_written,
)
from tests.fake_llm import Reply
from tests.processes import REPO, backend_env, wait_until

pytestmark = pytest.mark.label_studio




@pytest.fixture
def store(database_url, tmp_path: Path) -> dict[str, str]:
    """The settings that give every process of the test one shared store: SQLite in one MODEL_DIR (one
    host), or PostgreSQL (DATABASE_URL: any host; each process still has a MODEL_DIR of its own)."""
    return {"MODEL_DIR": str(tmp_path / "model"), **({"DATABASE_URL": database_url} if database_url else {})}


def rq_env(llm, store, label_studio, redis_url, **extra: str) -> dict[str, str]:
    """The backend's settings, as every process of a test (backend, CLI, workers) gets them."""
    values = dict(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token, REDIS_URL=redis_url,
                  LLM_RETRY_BASE="0.01", JOB_PART="20", WORKER_HEARTBEAT="1", DELIVERY_LEASE="30", **store)
    values.update(extra)
    return backend_env(llm.base_url, Path(values.pop("MODEL_DIR")), **values)




def rq_backend(backend_factory, env: dict[str, str], workers: int):
    """A backend that hands the jobs posted to it to the queue, with the test's store and settings."""
    return backend_factory(workers=workers, model_dir=Path(env["MODEL_DIR"]), **{k: env[k] for k in
                           ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "REDIS_URL", "JOB_PART")})


def start_job(backend, project) -> dict:
    started = httpx.post(backend.url + "/jobs", headers=job_auth(backend), json={"project": project.id}, timeout=60)
    assert started.status_code == 202, started.text
    return started.json()


def busy_worker(redis_url: str, pid: int) -> bool:
    """The `llm-ner worker` of this pid is running a part (RQ's record of it in Redis)."""
    return any(w.pid == pid and w.get_state() == "busy" for w in Worker.all(connection=Redis.from_url(redis_url)))


def waiting_for_parts(redis_url: str, pids: list[int]) -> bool:
    """Each of these `llm-ner worker`s has a slot waiting on the queue (RQ marks a slot idle just before its
    wait): a job posted now is split between all of them, however slowly each process started."""
    idle = {w.pid for w in Worker.all(connection=Redis.from_url(redis_url)) if w.get_state() == "idle"}
    return set(pids) <= idle


def parts_ran(log: str, job_id: str, ending: str = "done") -> int:
    return len(re.findall(rf"job {job_id} part \d+ \(\d+ tasks\): {ending}", log))


def test_a_job_on_rq_is_split_across_two_workers_every_task_once_with_progress_from_both(
    label_studio, backend_factory, connected_project, worker_factory, llm, store, redis_url
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.latency = 0.2  # 6 parts of 20 tasks, 4 calls at once per worker: seconds of progress to watch
    env = rq_env(llm, store, label_studio, redis_url, PREDICT_CONCURRENCY="4")
    backend = rq_backend(backend_factory, env, workers=1)
    project = connected_project(job_texts(120), title="rq job", backend=backend)
    workers = [worker_factory(env), worker_factory(env)]
    assert wait_until(lambda: waiting_for_parts(redis_url, [w.pid for w in workers]), timeout=120, interval=0.1)
    job = start_job(backend, project)
    assert job["runner"] == "rq" and job["state"] == "running" and job["total"] == 120

    def current() -> dict:
        return httpx.get(f"{backend.url}/jobs/{job['id']}", timeout=30).json()

    midway = wait_until(lambda: 0 < (j := current())["done"] < 120 and j, timeout=120, interval=0.05)
    assert midway and midway["state"] == "running" and midway["prompt_tokens"] > 0
    final = wait_until(lambda: (j := current())["state"] != "running" and j, timeout=180)
    assert final, current()
    assert (final["state"], final["done"], final["failed"], final["seen"]) == ("done", 120, 0, 120)
    assert_exact(project, project.model_version())
    assert len(llm.requests) == 120
    # the counts are the sum of both workers' parts: each ran some, and together all 6
    ran = [parts_ran(w.log_path.read_text(), job["id"]) for w in workers]
    assert all(n > 0 for n in ran) and sum(ran) == 6, ran
    assert final["calls"] == 120 and final["prompt_tokens"] > midway["prompt_tokens"]


def test_a_worker_killed_mid_part_has_its_part_re_run_by_the_other_without_a_duplicate_or_a_second_paid_call(
    label_studio, backend_factory, connected_project, worker_factory, llm, store, redis_url
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.latency = 0.2  # 12 parts of 10 tasks, 4 calls at once per worker: seconds in which to kill one
    # a part the killed worker had claimed for its write is re-run once its claims are older than
    # DELIVERY_LEASE: 15 s (Label Studio's writes time out at 5 s), not the 30 s of the other tests
    env = rq_env(llm, store, label_studio, redis_url, PREDICT_CONCURRENCY="4", JOB_PART="10", DELIVERY_LEASE="15")
    backend = backend_factory(workers=1, model_dir=Path(env["MODEL_DIR"]))
    project = connected_project(job_texts(120), title="rq kill", backend=backend)
    doomed, survivor = worker_factory(env), worker_factory(env)
    assert wait_until(lambda: waiting_for_parts(redis_url, [doomed.pid, survivor.pid]), timeout=120, interval=0.1)
    job = subprocess.Popen([sys.executable, "-m", "backend", "prelabel", "--project", str(project.id), "--yes", "--quiet",
                            *ls_args(label_studio)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: predictions_written(project) >= 20 and busy_worker(redis_url, doomed.pid), timeout=120, interval=0.05)
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        out, err = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out + err
    assert "120 pre-labeled, 0 failed, 0 skipped of 120 read" in out, out
    assert_exact(project, project.model_version())
    # answers reach the shared cache as they arrive: only the killed worker's calls in flight are paid twice
    assert 120 <= len(llm.requests) <= 120 + 4
    job_id = re.match(r"job (\w+):", out).group(1)
    assert survivor.poll() is None and parts_ran(survivor.log_path.read_text(), job_id) > 0


def test_a_burst_worker_started_after_a_worker_died_runs_its_abandoned_parts_too_before_it_stops(
    label_studio, backend_factory, connected_project, worker_factory, llm, redis_url, tmp_path
):
    """`llm-ner worker --burst` stops when nothing is left anywhere: not while the queue is empty but a
    dead worker's parts still count as running (until its missed heartbeats put them back)."""
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.latency = 0.2
    env = rq_env(llm, {"MODEL_DIR": str(tmp_path / "model")}, label_studio, redis_url, PREDICT_CONCURRENCY="2", DELIVERY_LEASE="10")
    project = connected_project(job_texts(40), title="rq burst", backend=backend_factory(workers=1, model_dir=Path(env["MODEL_DIR"])))
    doomed = worker_factory(env)
    job = subprocess.Popen([sys.executable, "-m", "backend", "prelabel", "--project", str(project.id), "--yes", "--quiet",
                            *ls_args(label_studio)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        registry = StartedJobRegistry("llm-ner", connection=Redis.from_url(redis_url))
        # both of its slots hold one of the job's two parts, some of it written: the queue is empty
        assert wait_until(lambda: registry.count == 2 and predictions_written(project) >= 2, timeout=120, interval=0.05)
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        burst = subprocess.run([sys.executable, "-m", "backend", "worker", "--burst"], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=240)
        assert burst.returncode == 0, burst.stdout + burst.stderr
        # it found the queue empty, waited for the dead worker's parts to be put back, and ran them
        assert registry.count == 0 and Queue("llm-ner", connection=Redis.from_url(redis_url)).count == 0
        assert predictions_written(project) == 40
        out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0 and "40 pre-labeled, 0 failed, 0 skipped of 40 read" in out, out + err
    assert_exact(project, project.model_version())


def test_cancel_stops_every_workers_parts_and_takes_the_queued_ones_off_the_queue(
    label_studio, backend_factory, connected_project, worker_factory, llm, store, redis_url
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.latency = 0.2
    env = rq_env(llm, store, label_studio, redis_url, PREDICT_CONCURRENCY="2")
    backend = rq_backend(backend_factory, env, workers=2)
    project = connected_project(job_texts(200), title="rq cancel", backend=backend)
    workers = [worker_factory(env), worker_factory(env)]
    job_id = start_job(backend, project)["id"]

    def current() -> dict:
        return httpx.get(f"{backend.url}/jobs/{job_id}", timeout=30).json()

    assert wait_until(lambda: current()["done"] >= 40 and all(busy_worker(redis_url, w.pid) for w in workers), timeout=120, interval=0.05)
    assert httpx.delete(f"{backend.url}/jobs/{job_id}", headers=job_auth(backend), timeout=30).status_code == 202
    final = wait_until(lambda: (j := current())["state"] != "running" and j, timeout=60)
    assert final and final["state"] == "cancelled" and 40 <= final["done"] < 200, final
    assert predictions_written(project) == final["done"]
    connection = Redis.from_url(redis_url)
    assert Queue("llm-ner", connection=connection).count == 0  # the queued parts were taken off
    assert StartedJobRegistry("llm-ner", connection=connection).count == 0  # and none runs any more
    # the parts running at the cancel let their calls in flight end and start nothing more
    assert len(llm.requests) <= final["done"] + 2 * 2
    assert sum(parts_ran(w.log_path.read_text(), job_id, "cancelled") for w in workers) >= 1
    assert httpx.delete(f"{backend.url}/jobs/{job_id}", headers=job_auth(backend), timeout=30).status_code == 409


def test_a_task_failing_in_a_workers_part_is_reported_with_its_reason_and_never_written_empty(
    label_studio, connected_project, worker_factory, llm, store, redis_url
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.responder = lambda body: Reply(status=500) if "poison" in body["messages"][-1]["content"] else llm.gazetteer_reply(body)
    env = rq_env(llm, store, label_studio, redis_url, LLM_MAX_RETRIES="0")
    # no backend connected: the command and the worker write, and the test reads Label Studio
    project = connected_project(["Ada Lovelace in Oslo.", "poison pill", "Royal Society."], title="rq failing", connect=False)
    worker_factory(env)
    done = cli("prelabel", "--project", str(project.id), "--yes", "--quiet", *ls_args(label_studio), env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    poisoned = project.tasks()[1]
    assert "2 pre-labeled, 1 failed, 0 skipped of 3 read" in done.stdout
    assert f"task {poisoned.id}: llm_server: HTTP 500" in done.stdout
    assert project.predictions(poisoned.id) == [] and len(llm.requests) == 2 + 3  # the poisoned one tried 3 times


def test_llm_rpm_is_one_budget_for_two_processes_sharing_redis(backend_factory, llm, tmp_path, redis_url):
    """Two backends (as on two hosts: separate MODEL_DIRs) with LLM_RPM=10: together they send 10
    requests in the minute, not 10 each; the tasks beyond it are left unanswered at the deadline."""
    llm.gazetteer = dict(JOB_GAZETTEER)
    limits = dict(REDIS_URL=redis_url, LLM_RPM="10", PREDICT_DEADLINE="3", PREDICT_BACKLOG="0")
    backends = [backend_factory(workers=1, model_dir=tmp_path / f"host-{i}", **limits) for i in range(2)]
    answers: list[dict] = [{}, {}]

    def ask(i: int) -> None:
        body = {"tasks": [{"id": 100 * i + n + 1, "data": {"text": t}} for n, t in enumerate(job_texts(10))], "project": "1.1",
                "label_config": NER_CONFIG}
        answers[i] = httpx.post(backends[i].url + "/predict", json=body, timeout=60).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answered = sum(1 for answer in answers for entry in answer["results"] if entry != [])
    assert len(llm.requests) == 10 and answered == 10



def test_a_worker_says_what_it_lacks_instead_of_a_traceback(llm, tmp_path, redis_url):
    unset = cli_on_fake(llm, tmp_path, "worker")
    assert unset.returncode == 2 and "set REDIS_URL" in unset.stderr
    malformed = cli_on_fake(llm, tmp_path, "worker", REDIS_URL="http://127.0.0.1:6379")
    assert malformed.returncode == 2 and "REDIS_URL" in malformed.stderr
    unreachable = cli_on_fake(llm, tmp_path, "worker", REDIS_URL="redis://:hunter2@127.0.0.1:1/0")
    assert unreachable.returncode == 1 and "cannot reach Redis at 127.0.0.1:1" in unreachable.stderr
    assert "hunter2" not in unreachable.stderr
    no_label_studio = cli_on_fake(llm, tmp_path, "worker", REDIS_URL=redis_url)
    assert no_label_studio.returncode == 2 and "LABEL_STUDIO_URL" in no_label_studio.stderr
    for run in (unset, malformed, unreachable, no_label_studio):
        assert "Traceback" not in run.stderr


def test_a_workers_wait_on_an_empty_queue_may_outlast_redis_pys_default_read_timeout(redis_url, tmp_path, monkeypatch):
    """A worker waits on the queue up to WORKER_HEARTBEAT seconds in one BLMOVE; redis-py 8 stops reading
    a socket after 5 s unless told otherwise. The worker's connection (the one JobQueue pinged first,
    lent again to the wait) must outlast the wait."""
    from backend.infra.settings import load_settings
    from backend.pipeline.jobs.jobqueue import JobQueue

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("WORKER_HEARTBEAT", "6")
    monkeypatch.chdir(tmp_path)
    queue = JobQueue(load_settings())
    queue.check()
    assert queue.connection.blmove("rq:queue:empty", "rq:queue:elsewhere", timeout=6) is None
