"""Secrets never show: not in the logs at any level, not in error answers, not in /metrics.

A full run of the real server (gunicorn, LOG_LEVEL=DEBUG) with known secrets, including an LLM that
echoes the API key in its error messages; then every captured byte is searched for them.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from urllib.parse import quote, quote_plus

import httpx
import pytest

from tests.conftest import NER_CONFIG, cli, job_auth
from tests.fake_llm import Reply
from tests.processes import REPO, TEST_API_KEY, backend_env, wait_until

BASIC_PASS = "basic-secret-0c9d7e21"
LS_API_KEY = "ls-api-key-secret-77aa10"
ACCESS_TOKEN = "ls-access-token-secret-5e5e"
PROJECT_TOKEN = "project-token-secret-a1b2c3"
SECRETS = [TEST_API_KEY, BASIC_PASS, LS_API_KEY, ACCESS_TOKEN, PROJECT_TOKEN]
AUTH = {"Authorization": "Basic " + base64.b64encode(f"robot:{BASIC_PASS}".encode()).decode()}


def leaked(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def test_a_full_run_at_debug_level_leaks_no_secret_into_logs_answers_or_metrics(backend_factory, llm):
    backend = backend_factory(
        workers=2, LOG_LEVEL="DEBUG", BASIC_AUTH_USER="robot", BASIC_AUTH_PASS=BASIC_PASS,
        LABEL_STUDIO_URL="http://127.0.0.1:9", LABEL_STUDIO_API_KEY=LS_API_KEY,
    )
    http = httpx.Client(base_url=backend.url, timeout=60)
    answers: list[str] = []

    def call(method, path, **kwargs):
        response = http.request(method, path, **kwargs)
        answers.append(f"{response.status_code} {response.headers} {response.text}")
        return response

    # the LLM rejects the key for one text and fails with the key in its message for another
    def responder(body):
        text = body["messages"][-1]["content"]
        if "reject" in text:
            return Reply(status=401, error_message=f"Incorrect API key provided: {TEST_API_KEY}")
        if "crash" in text:
            return Reply(status=500, error_message=f"internal error for key {TEST_API_KEY}")
        return llm.gazetteer_reply(body)

    llm.gazetteer = {"Ada": "PER"}
    llm.responder = responder
    setup = {"project": "3", "schema": NER_CONFIG, "hostname": "http://ls", "access_token": ACCESS_TOKEN,
             "extra_params": {"token": ACCESS_TOKEN}}
    assert call("POST", "/setup", json=setup, headers=AUTH).status_code == 200
    tasks = [{"id": 1, "data": {"text": "Ada wrote."}}, {"id": 2, "data": {"text": "please reject"}},
             {"id": 3, "data": {"text": "please crash"}}]
    predicted = call("POST", "/predict", json={"tasks": tasks, "project": "3.1", "label_config": NER_CONFIG,
                                               "params": {"login": "robot", "password": BASIC_PASS, "context": None}},
                     headers=AUTH)
    assert predicted.status_code == 200
    first, rejected, crashed = predicted.json()["results"]
    assert len(first["result"]) == 1 and rejected == [] and crashed == []  # failed tasks: unanswered, asked again
    project = {"id": 3, "token": PROJECT_TOKEN, "label_config": NER_CONFIG}
    region = {"from_name": "label", "to_name": "text", "type": "labels",
              "value": {"start": 0, "end": 3, "text": "Ada", "labels": ["PER"]}}
    events = [
        {"action": "ANNOTATION_CREATED", "annotation": {"id": 5, "task": 1, "result": [region]},
         "task": {"id": 1, "data": {"text": "Ada wrote."}}, "project": project},
        {"action": "START_TRAINING", "project": project},
        {"action": "PROJECT_UPDATED", "project": project},
    ]
    # /webhook needs the basic auth too; with Label Studio credentials an annotation is read back from
    # Label Studio, which is unreachable here: 503, and its error in the log, masked like the rest
    assert [call("POST", "/webhook", json=event, headers=AUTH).status_code for event in events] == [503, 201, 201]
    # refused requests: wrong password (the real one with a suffix), bad bodies carrying secrets
    wrong = {"Authorization": "Basic " + base64.b64encode(f"robot:{BASIC_PASS}x".encode()).decode()}
    assert call("POST", "/setup", json=setup, headers=wrong).status_code == 401
    assert call("POST", "/setup", json={**setup, "project": {"token": ACCESS_TOKEN}}, headers=AUTH).status_code == 400
    assert call("POST", "/setup", json={**setup, "extra_params": ACCESS_TOKEN}, headers=AUTH).status_code == 400
    assert call("POST", "/predict", json={"tasks": ACCESS_TOKEN, "project": "3"}, headers=AUTH).status_code == 400
    metrics = call("GET", "/metrics", headers=AUTH)
    assert "llm_ner_requests_total" in metrics.text

    # the secrets were really in play: the LLM got the key, and its errors were logged (masked)
    assert f"Bearer {TEST_API_KEY}" in llm.auth_headers
    log = backend.log()
    assert "DEBUG" in log and ("401" in log or "Incorrect API key" in log), log[-2000:]
    assert leaked(log) == [], f"secrets in the backend log: {leaked(log)}"
    assert leaked("\n".join(answers)) == [], "secrets in an HTTP answer"


@pytest.mark.parametrize("bad, named", [({"LLM_TIMEOUT": "-1"}, "LLM_TIMEOUT"), ({"BASIC_AUTH_USER": ""}, "BASIC_AUTH")])
def test_a_configuration_error_names_the_setting_but_never_prints_a_secret(tmp_path, bad, named):
    settings = {"BASIC_AUTH_USER": "robot", "BASIC_AUTH_PASS": BASIC_PASS, "LABEL_STUDIO_API_KEY": LS_API_KEY, **bad}
    env = backend_env("http://127.0.0.1:9/v1", tmp_path / "model", **settings)
    result = subprocess.run([sys.executable, "-m", "backend", "serve", "--port", "1"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert named in result.stderr
    assert leaked(result.stdout + result.stderr) == []
    assert "Traceback" not in result.stderr


# ---- a planted key on every way out: answers, job records, the store, the log, the CLI and its files ----
URL_PASSWORD = "url-pass-secret-5b5b"  # in OPENAI_BASE_URL's userinfo


class EchoingProxy:
    """A proxy in front of the real Label Studio that, for paths starting with `fail`, answers 502 with a
    body quoting the request's Authorization header (as misconfigured proxies and debug pages do)."""

    def __init__(self, upstream: str):
        import http.server
        import threading

        self.upstream, self.fail, self.echoed = upstream, None, 0
        self.status, self.cookie, self.copies = 502, None, 1  # the failing answer: status, a Set-Cookie, the echo's copies
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.fail is not None and self.path.startswith(proxy.fail):
                    proxy.echoed += 1
                    status, headers = proxy.status, {"Content-Type": "application/json"}
                    if proxy.cookie:
                        headers = {"Set-Cookie": f"sessionid={proxy.cookie}; HttpOnly; Path=/", **headers}
                    echo = " ".join([f"Authorization {self.headers.get('Authorization')}"] * proxy.copies)
                    content = json.dumps({"detail": f"{echo} refused upstream ({self.path})"}).encode()
                else:
                    sent = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
                    answer = httpx.request(self.command, proxy.upstream + self.path, headers=sent, content=body, timeout=120)
                    status, content = answer.status_code, answer.content
                    headers = {k: v for k, v in answer.headers.items() if k.lower() in ("content-type", "location")}
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _relay

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def store_text(path) -> str:
    """Everything a SQLite store holds, as SQL text: what its WAL file holds too (the newest rows stay
    there, not in the main file, until a checkpoint), which the main file's bytes alone miss."""
    import sqlite3

    with sqlite3.connect(path) as conn:
        return "\n".join(conn.iterdump())


def spellings(secret: str) -> list[str]:
    return sorted({secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]})


@pytest.mark.label_studio
def test_a_planted_key_that_label_studio_or_a_proxy_echoes_never_leaves_by_any_way_out(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    key = label_studio.token
    planted = [s for secret in (key, BASIC_PASS, URL_PASSWORD) for s in spellings(secret)]
    llm.gazetteer = {"Ada": "PER"}
    llm_url = llm.base_url.replace("://", f"://robot:{URL_PASSWORD}@", 1)
    project = connected_project(["Ada wrote.", "Ada read."], title="planted key", connect=False)
    proxy = EchoingProxy(label_studio.url)
    outward: list[str] = []  # everything that left, from every way out
    try:
        model_dir = tmp_path / "model"
        backend = backend_factory(workers=1, model_dir=model_dir, LABEL_STUDIO_URL=proxy.url, LABEL_STUDIO_API_KEY=key,
                                  BASIC_AUTH_USER="robot", BASIC_AUTH_PASS=BASIC_PASS, OPENAI_BASE_URL=llm_url)
        http = httpx.Client(base_url=backend.url, timeout=60, headers=AUTH)

        def call(method, path, **kwargs):
            response = http.request(method, path, **kwargs)
            outward.append(f"{response.status_code} {response.headers} {response.text}")
            return response

        # a job that starts (the project is read) and fails on the tasks, the proxy quoting the key
        proxy.fail = "/api/tasks"
        started = call("POST", "/jobs", json={"project": project.id})
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]
        wait_until(lambda: call("GET", f"/jobs/{job_id}").json()["state"] != "running", timeout=120)
        job = call("GET", f"/jobs/{job_id}").json()
        assert job["state"] == "failed" and "***" in job["message"], job
        call("GET", "/jobs")
        # an error answer quoting Label Studio's body, and the rest of the routes
        proxy.fail = "/api/projects"
        refused = call("POST", "/jobs", json={"project": project.id})
        assert refused.status_code >= 400, refused.text
        call("POST", "/setup", json={"project": str(project.id), "schema": NER_CONFIG})
        call("POST", "/predict", json={"tasks": [{"id": 1, "data": {"text": "Ada wrote."}}], "project": str(project.id)})
        call("GET", "/health")
        call("GET", "/metrics")
        outward.append(backend.log())
        outward.append(store_text(model_dir / "backend.sqlite3"))

        # the command line: connect and prelabel through the echoing proxy, doctor and reports with the URL's password
        env = backend_env(llm_url, tmp_path / "cli-model", LABEL_STUDIO_URL=proxy.url, LABEL_STUDIO_API_KEY=key,
                          BASIC_AUTH_USER="robot", BASIC_AUTH_PASS=BASIC_PASS, LLM_RETRY_BASE="0.01")
        runs = [
            cli("connect", "--project", str(project.id), "--url", backend.url, env=env),
            cli("prelabel", "--project", str(project.id), "--yes", "--quiet", env=env),
            cli("doctor", "--json", str(tmp_path / "doctor.json"), env={**env, "LLM_PROBE": "true"}),
        ]
        source = tmp_path / "one.conll"
        source.write_text("Ada B-PER\nwrote O\n. O\n\nAda B-PER\nread O\n. O\n", encoding="utf-8")
        config = tmp_path / "one.env"
        config.write_text(f"OPENAI_BASE_URL={llm_url}\n", encoding="utf-8")
        reports = [tmp_path / "report.json", tmp_path / "report.html"]
        runs.append(cli("compare", str(source), "--per", "sentence", "--config", str(config), "--quiet",
                        "--json", str(reports[0]), "--html", str(reports[1]), env=env))
        assert proxy.echoed >= 3  # the job's tasks, the refused job, connect (and prelabel)
        assert runs[-1].returncode == 0, runs[-1].stderr
        assert "***" in runs[0].stdout + runs[0].stderr and "***" in runs[2].stdout  # connect's error, doctor's endpoint
        outward += [run.stdout + run.stderr for run in runs]
        outward += [path.read_text(encoding="utf-8") for path in [*reports, tmp_path / "doctor.json"] if path.exists()]
        assert "robot:***@" in reports[0].read_text(encoding="utf-8")  # the report names the endpoint, masked
    finally:
        proxy.close()
    found = [(secret, text[max(0, text.find(secret) - 200):text.find(secret) + 50]) for text in outward for secret in planted
             if secret in text]
    assert found == [], found


@pytest.mark.label_studio
def test_a_key_given_as_an_option_never_reaches_the_store_or_the_job_records(label_studio, connected_project, llm, tmp_path):
    """`llm-ner prelabel --api-key KEY` with no LABEL_STUDIO_API_KEY: the job's record (in the store that
    the backend's GET /jobs reads) quoted the proxy's echo of the key unmasked, the backend's settings
    knowing nothing of a key given as an option."""
    key = label_studio.token
    project = connected_project(["Ada wrote."], title="key as an option", connect=False)
    proxy = EchoingProxy(label_studio.url)
    proxy.fail = "/api/tasks"  # the project is read; listing its tasks fails, the proxy quoting the key
    model_dir = tmp_path / "cli-model"
    try:
        run = cli("prelabel", "--project", str(project.id), "--yes", "--quiet", "--label-studio-url", proxy.url,
                  "--api-key", key, env=backend_env(llm.base_url, model_dir, LLM_RETRY_BASE="0.01"))
    finally:
        proxy.close()
    assert proxy.echoed >= 1 and run.returncode == 1, run.stdout + run.stderr
    stored = store_text(model_dir / "backend.sqlite3")
    assert "refused upstream" in stored and "***" in stored  # the job's message quotes the echo, masked
    assert [s for s in spellings(key) if s in stored + run.stdout + run.stderr] == []


COOKIE = "sessionid-secret-4d4d2e"


@pytest.mark.label_studio
def test_a_label_studio_refusal_shows_its_reason_in_the_job_record_but_no_key_head_and_no_cookie(
    label_studio, backend_factory, connected_project, llm, tmp_path
):
    """A job's message was `str(error)[:300]`: the SDK's error text starts with Label Studio's answer
    headers (its session cookie), and the cut at 300 characters could fall inside a key the answer
    quoted, whose head then went out unmasked. GET /jobs needs no credentials in open mode."""
    key = label_studio.token
    project = connected_project(["Ada wrote."], title="refusal with a cookie", connect=False)
    proxy = EchoingProxy(label_studio.url)
    # a 403 whose body quotes the key again and again, across the 300th character, with a session cookie
    proxy.fail, proxy.status, proxy.cookie, proxy.copies = "/api/tasks", 403, COOKIE, 12
    try:
        backend = backend_factory(workers=1, LABEL_STUDIO_URL=proxy.url, LABEL_STUDIO_API_KEY=key)
        started = httpx.post(backend.url + "/jobs", json={"project": project.id}, headers=job_auth(backend), timeout=60)
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]
        ended = wait_until(lambda: (j := httpx.get(f"{backend.url}/jobs/{job_id}", timeout=30).json())["state"] != "running" and j,
                           timeout=120, interval=0.5)
        listed = httpx.get(backend.url + "/jobs", timeout=30)
    finally:
        proxy.close()
    assert proxy.echoed >= 1 and ended and ended["state"] == "failed", ended
    # Label Studio's reason is there (its status and body, the key masked), its headers are not
    assert "HTTP 403 from Label Studio: Authorization" in ended["message"] and "(/api/tasks" in ended["message"], ended
    assert "***" in ended["message"], ended
    outward = [listed.text, httpx.get(f"{backend.url}/jobs/{job_id}", timeout=30).text, backend.log()]
    assert listed.status_code == 200 and job_id in listed.text, listed.text
    head = key[: len(key) // 4]  # what a cut inside the key leaves
    found = [(what, text[max(0, text.find(what) - 100):text.find(what) + 40]) for text in map(str.lower, outward)
             for what in (COOKIE, head.lower(), "set-cookie") if what in text]
    assert found == [], found
