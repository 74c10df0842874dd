"""Pre-labeling a project through the provider's Batch API (`llm-ner prelabel --batch-api`, and
`--batch-file-out` / `--batch-results` for self-hosters) against a real Label Studio 1.23, the
provider being the fake server's /v1/files and /v1/batches driven by the real openai client."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import httpx
import pytest

from backend.infra.storage import DB_NAME
from tests.conftest import JOB_GAZETTEER, assert_exact, cli, job_auth, job_texts, ls_args, predictions_by_task
from tests.fake_llm import Reply, entities_reply
from tests.processes import REPO, backend_env, stop, wait_until

pytestmark = pytest.mark.label_studio

PRICES = '{"fake": [1000, 2000]}'  # USD per 1M tokens: large, so that costs compare beyond rounding



def job_env(llm, model_dir, label_studio, **extra) -> dict[str, str]:
    return backend_env(llm.base_url, model_dir, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token,
                       LLM_RETRY_BASE="0.01", BATCH_POLL_SECONDS="0.05", LLM_PRICES=PRICES, **extra)


def prelabel(llm, model_dir, label_studio, *args, **env) -> subprocess.CompletedProcess:
    return cli("prelabel", *args, "--quiet", "--yes", env=job_env(llm, model_dir, label_studio, **env))


def store(model_dir, sql: str, params: tuple = ()) -> list[tuple]:
    with sqlite3.connect(model_dir / DB_NAME) as conn:
        return conn.execute(sql, params).fetchall()


def results_of(project) -> dict[int, set]:
    """Each task's one prediction: its (start, end, label, score) regions and its score; fails on a task with two."""
    out = {}
    tasks = project.tasks()
    held = predictions_by_task(project, tasks)
    for task in tasks:
        (prediction,) = held[task.id]
        regions = {(r["value"]["start"], r["value"]["end"], r["value"]["labels"][0], r.get("score")) for r in prediction.result}
        out[task.data["text"]] = (regions, prediction.score)
    return out



def test_batch_api_pre_labels_every_task_like_the_synchronous_job_with_no_synchronous_call_at_half_price(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.auto_logprobs = -0.05  # scores too must come out the same
    model_dir, twin_dir = tmp_path / "model", tmp_path / "twin"  # the twin has a response cache of its own
    batched = connected_project(job_texts(30), title="batch", backend=backend_factory(workers=1, model_dir=model_dir))
    synchronous = connected_project(job_texts(30), title="sync twin", backend=backend_factory(workers=1, model_dir=twin_dir))

    dry = prelabel(llm, model_dir, label_studio, "--project", str(batched.id), "--batch-api", "--dry-run")
    assert dry.returncode == 0 and "Batch API cost  $" in dry.stdout and "half the synchronous $" in dry.stdout

    # 30 distinct texts, 7 requests a batch at most: the requests are split over 5 batches
    done = prelabel(llm, model_dir, label_studio, "--project", str(batched.id), "--batch-api", BATCH_MAX_REQUESTS="7")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "30 pre-labeled, 0 failed" in done.stdout
    assert llm.requests == []  # not one synchronous call
    assert len(llm.batches) == 5 and len(llm.batch_requests) == 30
    assert sorted(b["request_counts"]["total"] for b in llm.batches.values()) == [2, 7, 7, 7, 7]
    assert all(b["status"] == "completed" for b in llm.batches.values())
    assert_exact(batched, batched.model_version())

    again = prelabel(llm, twin_dir, label_studio, "--project", str(synchronous.id))
    assert again.returncode == 0 and len(llm.requests) == 30
    assert results_of(batched) == results_of(synchronous)  # the same predictions, scores included

    # the same tokens, at half the price: in the usage ledger and in each job's cost
    [(batch_cost,)], [(sync_cost,)] = store(model_dir, "SELECT cost_usd FROM llm_usage"), store(twin_dir, "SELECT cost_usd FROM llm_usage")
    assert sync_cost > 0 and batch_cost == pytest.approx(sync_cost / 2)
    assert store(model_dir, "SELECT cost_usd FROM jobs WHERE done = 30") == [(pytest.approx(batch_cost),)]
    assert store(twin_dir, "SELECT cost_usd FROM jobs WHERE done = 30") == [(pytest.approx(sync_cost),)]
    assert f"${batch_cost:.4f} at the batch price (synchronous: ${sync_cost:.4f}, saved ${sync_cost - batch_cost:.4f})" in done.stdout

    rerun = prelabel(llm, model_dir, label_studio, "--project", str(batched.id), "--batch-api")
    assert "0 pre-labeled, 0 failed, 30 skipped" in rerun.stdout and len(llm.batches) == 5  # nothing left: no batch


def test_lines_that_fail_in_the_batch_or_that_an_expired_batch_left_are_sent_synchronously_or_reported(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    model_dir = tmp_path / "model"
    backend = backend_factory(workers=1, model_dir=model_dir)
    project = connected_project(job_texts(12), title="partial", backend=backend)
    llm.batch_fail = lambda body: "Note 1:" in body["messages"][-1]["content"] or "Note 2:" in body["messages"][-1]["content"]
    done = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--batch-api")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "12 pre-labeled, 0 failed" in done.stdout
    assert "2 failed and 0 unfinished, sent synchronously" in done.stdout
    assert len(llm.batch_requests) == 12 and len(llm.requests) == 2  # only the two failed lines, again
    assert {m for r in llm.requests for m in ("Note 1:", "Note 2:") if m in r["messages"][-1]["content"]} == {"Note 1:", "Note 2:"}
    assert_exact(project, project.model_version())

    # an expired batch answered 3 of its 8 lines; the rest go synchronous, and a task whose
    # synchronous call fails too is reported with its reason, never written empty
    expiring = connected_project(job_texts(8, word="Memo"), title="expired", backend=backend)
    llm.reset()
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.batch_expire_after = 3
    llm.responder = lambda body: Reply(status=500) if "Memo 7:" in body["messages"][-1]["content"] else llm.gazetteer_reply(body)
    done = prelabel(llm, model_dir, label_studio, "--project", str(expiring.id), "--batch-api", LLM_MAX_RETRIES="0")
    assert done.returncode == 1
    assert "expired: 3 of 8 answered" in done.stdout, done.stdout
    assert "0 failed and 5 unfinished, sent synchronously" in done.stdout
    assert "7 pre-labeled, 1 failed" in done.stdout
    poisoned = next(t for t in expiring.tasks() if t.data["text"].startswith("Memo 7:"))
    assert f"task {poisoned.id}: llm_server: HTTP 500" in done.stdout
    assert expiring.predictions(poisoned.id) == []
    assert len(llm.requests) == 4 + 3  # each unfinished line once, the failing one in each of the job's 3 tries


def test_a_job_killed_while_its_batch_runs_resumes_that_batch_without_a_second_one_or_a_duplicate(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.batch_hold = True  # the batch stays in_progress until the test lets it go
    model_dir = tmp_path / "model"
    project = connected_project(job_texts(20), title="restart", backend=backend_factory(workers=1, model_dir=model_dir))
    args = [sys.executable, "-m", "backend", "prelabel", "--project", str(project.id), "--yes", "--quiet", "--batch-api",
            *ls_args(label_studio)]
    proc = subprocess.Popen(args, cwd=REPO, env=job_env(llm, model_dir, label_studio), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        polled = lambda: (model_dir / DB_NAME).exists() and store(model_dir, "SELECT status FROM llm_batches") == [("in_progress",)]
        assert wait_until(polled, timeout=120, interval=0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [b["status"] for b in llm.batches.values()] == ["in_progress"]
    llm.batch_hold = False
    done = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--batch-api")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(llm.batches) == 1 and len(llm.batch_requests) == 20  # the stored batch, polled again
    assert llm.requests == [] and "20 pre-labeled, 0 failed" in done.stdout
    assert_exact(project, project.model_version())  # one prediction per task


def test_batch_file_out_then_batch_results_round_trip(label_studio, backend_factory, connected_project, llm, tmp_path):
    llm.gazetteer = dict(JOB_GAZETTEER)
    model_dir = tmp_path / "model"
    project = connected_project(job_texts(10), title="files", backend=backend_factory(workers=1, model_dir=model_dir))
    requests = tmp_path / "requests.jsonl"
    out = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--batch-file-out", str(requests))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [json.loads(line) for line in requests.read_text().splitlines()]
    assert len(lines) == 10 and "10 requests for 10 tasks written to" in out.stdout
    assert "estimated cost: $" in out.stdout and "at the Batch API's half price (synchronous: $" in out.stdout
    assert {(line["method"], line["url"]) for line in lines} == {("POST", "/v1/chat/completions")}
    assert llm.requests == [] and all(project.predictions(t.id) == [] for t in project.tasks())

    # what `vllm run-batch` writes: one output line per request, plus a line of some other file
    results = tmp_path / "results.jsonl"
    answered = [
        {"id": f"vllm-{i}", "custom_id": line["custom_id"], "error": None,
         "response": {"status_code": 200, "request_id": f"r{i}", "body": llm.completion(line["body"], llm.gazetteer_reply(line["body"]))}}
        for i, line in enumerate(lines)
    ]
    stray = dict(answered[0], custom_id="ner-0000000000000000000000000000000000000000")
    results.write_text("".join(json.dumps(r) + "\n" for r in [*answered, stray]))
    done = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--batch-results", str(results))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "11 lines, 10 answers and 0 failed lines" in done.stdout
    assert "1 lines match no request still to answer" in done.stdout
    assert "10 pre-labeled, 0 failed" in done.stdout and llm.requests == []
    assert_exact(project, project.model_version())


def test_a_results_file_naming_each_request_twice_is_reported_and_accounted_once(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    model_dir = tmp_path / "model"
    project = connected_project(job_texts(6), title="twice", backend=backend_factory(workers=1, model_dir=model_dir))
    requests = tmp_path / "requests.jsonl"
    assert prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--batch-file-out", str(requests)).returncode == 0
    lines = [json.loads(line) for line in requests.read_text().splitlines()]
    answers = [{"custom_id": line["custom_id"], "error": None,
                "response": {"status_code": 200, "body": llm.completion(line["body"], llm.gazetteer_reply(line["body"]))}}
               for line in lines]
    wrong = [dict(a, response={"status_code": 200, "body": llm.completion(line["body"], entities_reply([]))})
             for a, line in zip(answers, lines)]  # a second answer naming no entity: the first must win
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in [*answers, *wrong]))
    done = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--batch-results", str(results))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "12 lines, 6 answers and 0 failed lines" in done.stdout
    assert "6 lines name a request an earlier line named: each request counted once" in done.stdout
    once = sum(a["response"]["body"]["usage"]["prompt_tokens"] for a in answers)
    assert f"Batch API: 1 batch(es), 6 requests: 6 answered; {once} prompt" in done.stdout, done.stdout
    assert "6 pre-labeled, 0 failed" in done.stdout and llm.requests == []
    assert_exact(project, project.model_version())


def test_bad_batch_files_get_a_clear_message_and_no_traceback(label_studio, connected_project, llm, tmp_path):
    model_dir = tmp_path / "model"
    project = connected_project(job_texts(2), title="bad files", connect=False)  # no backend: nothing gets that far
    cases = {
        "missing.jsonl": (None, "cannot read"),
        "prose.jsonl": ("this is not json\n", "prose.jsonl line 1: not a JSON line"),
        "no-id.jsonl": ('{"response": {"status_code": 200, "body": {}}}\n', "no-id.jsonl line 1: no custom_id"),
        "empty.jsonl": ("\n", "holds no result lines"),
        "binary.jsonl": (b"\xff\xfe\x00", "is not UTF-8 text"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        bad = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--batch-results", str(path))
        assert (bad.returncode, "Traceback" in bad.stderr) == (1, False), (name, bad.stderr)
        assert message in bad.stderr, (name, bad.stderr)
    unwritable = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--batch-file-out", str(tmp_path / "no" / "dir.jsonl"))
    assert unwritable.returncode == 1 and "cannot write" in unwritable.stderr and "Traceback" not in unwritable.stderr
    full = prelabel(llm, model_dir, label_studio, "--project", str(project.id), "--batch-file-out", "/dev/full")  # a full disk
    assert (full.returncode, "Traceback" in full.stderr) == (1, False), full.stderr
    assert [line for line in full.stderr.splitlines() if line.startswith("llm-ner:")] == [
        "llm-ner: cannot write /dev/full: No space left on device"], full.stderr
    assert llm.requests == [] and llm.batches == {}


def test_a_batch_api_job_runs_inside_the_backend_over_http(label_studio, backend_factory, connected_project, llm, tmp_path):
    llm.gazetteer = dict(JOB_GAZETTEER)
    backend = backend_factory(workers=1, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token,
                              BATCH_POLL_SECONDS="0.05")
    project = connected_project(job_texts(12), title="http batch", backend=backend)
    started = httpx.post(backend.url + "/jobs", headers=job_auth(backend), json={"project": project.id, "batch_api": True}, timeout=60)
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    final = wait_until(lambda: (j := httpx.get(f"{backend.url}/jobs/{job_id}").json())["state"] != "running" and j, timeout=120)
    assert final["state"] == "done" and final["done"] == 12 and final["failed"] == 0
    assert llm.requests == [] and len(llm.batches) == 1
    assert_exact(project, project.model_version())


def test_a_backend_restarted_while_its_batch_api_job_waits_resumes_the_stored_batch(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.batch_hold = True
    model_dir = tmp_path / "model"
    # a killed job's heartbeat is stale after JOB_HEARTBEAT (60 s by default; 10 s here, the same proof)
    env = dict(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token, BATCH_POLL_SECONDS="0.05",
               JOB_HEARTBEAT="10")
    backend = backend_factory(workers=2, model_dir=model_dir, **env)
    project = connected_project(job_texts(10), title="backend restart", backend=backend)
    started = httpx.post(backend.url + "/jobs", headers=job_auth(backend), json={"project": project.id, "batch_api": True}, timeout=60)
    assert started.status_code == 202, started.text
    assert wait_until(lambda: store(model_dir, "SELECT status FROM llm_batches") == [("in_progress",)], timeout=120, interval=0.05)
    stop(backend.proc, signal.SIGKILL)  # the whole backend, mid-wait
    llm.batch_hold = False
    project.backend = backend_factory(workers=2, model_dir=model_dir, **env)  # same store, same MODEL_DIR
    # it waits for the killed job's heartbeat to go stale (JOB_HEARTBEAT), then one worker resumes it
    written = lambda: all(len(held) == 1 for held in predictions_by_task(project).values())
    assert wait_until(written, timeout=180, interval=0.5)
    assert len(llm.batches) == 1 and len(llm.batch_requests) == 10 and llm.requests == []
    assert_exact(project, project.model_version())
    assert store(model_dir, "SELECT phase FROM llm_batches") == [("used",)]


def test_cancelling_a_batch_api_job_while_its_batch_waits_cancels_the_batch_at_the_provider_and_writes_nothing(
    label_studio, backend_factory, connected_project, llm
):
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.batch_hold = True  # the provider keeps the batch in_progress
    backend = backend_factory(workers=1, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token,
                              BATCH_POLL_SECONDS="0.05")
    project = connected_project(job_texts(8), title="batch cancel", backend=backend)
    started = httpx.post(backend.url + "/jobs", headers=job_auth(backend), json={"project": project.id, "batch_api": True}, timeout=60)
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    assert wait_until(lambda: [b["status"] for b in llm.batches.values()] == ["in_progress"], timeout=120, interval=0.05)
    assert httpx.delete(f"{backend.url}/jobs/{job_id}", headers=job_auth(backend), timeout=30).status_code == 202
    final = wait_until(lambda: (j := httpx.get(f"{backend.url}/jobs/{job_id}").json())["state"] != "running" and j, timeout=60)
    assert final["state"] == "cancelled" and "its batches too" in final["message"], final
    (batch,) = llm.batches.values()
    assert batch["status"] in ("cancelling", "cancelled")  # the provider was asked to stop it
    assert final["done"] == 0 and llm.requests == [] and llm.batch_requests == []  # nothing answered, nothing paid
    assert all(project.predictions(t.id) == [] for t in project.tasks())
    assert httpx.delete(f"{backend.url}/jobs/{job_id}", headers=job_auth(backend), timeout=30).status_code == 409
