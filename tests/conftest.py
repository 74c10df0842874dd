"""Fixtures and helpers shared by the test modules (no test module imports another one).

- the fake LLM (`llm`), settings and in-process apps (`make_settings`, `make_client`, `client`);
- real processes: `backend_factory` (gunicorn), `label_studio` (one per session), and
  `connected_project`, a Label Studio project with this backend connected as its model;
- the store's engines: `database_url` parametrizes a test over SQLite and PostgreSQL (a fresh database
  of the session's own cluster, `postgres`); settings and backends of that test use it;
- `ls_proxy`: a proxy in front of the session's Label Studio that can answer 504 after forwarding (tests/ls_proxy.py);
- `redis_server` (one per session) with `redis_url` (emptied per test), and `worker_factory` (`llm-ner worker`);
- `predict` (POST /predict, checked), `region_tuples` (regions as comparable tuples), `metric`
  (one Prometheus sample of this process), `shown_examples` (the few-shot exchanges of a prompt);
- Label Studio webhook payloads (`annotation_event`, `deleted_event`, `span`);
- Wikigold: `WIKIGOLD`, `wikigold_slice`, and a gazetteer that imitates an imperfect LLM;
- the `llm-ner` command (`run_cli`, `cli`, `cli_on_fake`, `ls_args`, ...), configuration files for
  `compare`, headless Chromium (`browser`) and `check_html_report` for the HTML reports;
- golden files: `assert_golden` (exact comparison with tests/golden/, UPDATE_GOLDEN=1 rewrites) and
  `transcript` (chat messages as a readable text).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.fake_llm import FakeLLM
from tests.ls_proxy import LabelStudioProxy, serve
from tests.processes import (
    REPO,
    TEST_API_KEY,
    Backend,
    LabelStudio,
    Postgres,
    RedisServer,
    backend_env,
    run_backend,
    run_label_studio,
    run_postgres,
    run_redis,
    run_worker,
    started_label_studio,
    wait_until,
)

WIKIGOLD = Path(__file__).resolve().parent / "data" / "wikigold" / "wikigold.conll.txt"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
# small Chinese samples written for this project (tests/data/zh/README.md)
ZH_DATA = Path(__file__).resolve().parent / "data" / "zh"
GOLDEN = Path(__file__).resolve().parent / "golden"

NER_CONFIG = """<View>
  <Labels name="label" toName="text">
    <Label value="PER" background="red" hint="people, including fictional"/>
    <Label value="ORG" background="blue"/>
    <Label value="LOC" background="green"/>
    <Label value="MISC" background="orange"/>
  </Labels>
  <Text name="text" value="$text"/>
</View>"""


def pytest_configure(config) -> None:
    """Tests press Ctrl-C: they send SIGINT to `llm-ner demo` and `llm-ner prelabel` and expect them to stop.
    A shell without job control that starts pytest in the background (`make test &` in a script) makes it
    ignore SIGINT, and every process it starts inherits that: the demo went on running, then was killed
    with Label Studio and its backend left behind. Processes started from here take SIGINT as a terminal does."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def fake_llm_server():
    server = FakeLLM()
    yield server
    server.close()


@pytest.fixture
def llm(fake_llm_server: FakeLLM) -> FakeLLM:
    """The fake OpenAI-compatible server, reset for this test."""
    fake_llm_server.reset()
    return fake_llm_server


TEMPLATE_DB = "llm_ner_template"


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    """A real PostgreSQL cluster of the session's own (Debian's binaries, a temp dir, a free port), with
    a template database at the newest schema: a test's database is a cheap copy of it."""
    from backend.infra.storage import Database

    with run_postgres() as pg:
        pg.admin(f"CREATE DATABASE {TEMPLATE_DB}")
        Database(url=pg.url(TEMPLATE_DB)).close()
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> str | None:
    """The store engine of this test, one run per engine: None (SQLite under MODEL_DIR) or the URL of a
    fresh PostgreSQL database. `make_settings` and `backend_factory` use it; the database is dropped
    after the test (its connections with it)."""
    if request.param == "sqlite":
        yield None
        return
    yield request.getfixturevalue("postgres_url")


@pytest.fixture
def postgres_url(postgres: Postgres) -> str:
    """The URL of a fresh PostgreSQL database at the newest schema, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    postgres.admin(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    yield postgres.url(name)
    postgres.admin(f"DROP DATABASE {name} WITH (FORCE)")


def engine_url(request) -> str | None:
    """The test's `database_url` when it asks for one (parametrized over both engines), else None (SQLite)."""
    return request.getfixturevalue("database_url") if "database_url" in request.fixturenames else None


def open_store(settings):
    """The store these settings name (SQLite under MODEL_DIR, or DATABASE_URL): what the backend reads."""
    from backend.infra.storage import Database

    return Database.from_settings(settings)


@pytest.fixture
def make_settings(tmp_path: Path, llm: FakeLLM, request):
    """Settings for an app on the fake LLM: make_settings(**fields) overrides any Settings field."""
    from backend.infra.settings import load_settings

    url = engine_url(request)

    def make(**overrides):
        # no probe unless a test asks for one: its requests would mix with the ones a test counts
        values = dict(
            openai_api_key=TEST_API_KEY, openai_base_url=llm.base_url, llm_model="fake-model",
            model_dir=tmp_path / "model", llm_retry_base=0.01, llm_probe=False, _env_file=None,
            # every change shows in model_version at once (tests/test_trust.py tests the coalescing)
            version_coalesce_seconds=0, database_url=url,
        )
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture(autouse=True)
def late_work_drained():
    """After each test, wait for the in-process apps' tasks still running past a /predict deadline
    (PREDICT_BACKLOG): their LLM calls must not land in the next test's fake server."""
    yield
    if not wait_until(lambda: not REGISTRY.get_sample_value("llm_ner_backlog_tasks"), timeout=30, interval=0.05):
        raise AssertionError("tasks kept past a deadline were still running 30 s after the test")


@pytest.fixture
def settings(make_settings):
    return make_settings()


@pytest.fixture
def make_client(make_settings):
    """A test client of a new app: make_client(setup_project="7", **settings fields).

    Apps made with the same MODEL_DIR share its SQLite store, as gunicorn workers do.
    """
    from backend.protocol.server import create_app

    def make(setup_project: str | None = None, **overrides):
        client = create_app(make_settings(**overrides)).test_client()
        if setup_project is not None:
            response = client.post("/setup", json={"project": setup_project, "schema": NER_CONFIG})
            assert response.status_code == 200, response.json
        return client

    return make


@pytest.fixture
def app(settings):
    from backend.protocol.server import create_app

    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def backend_factory(tmp_path: Path, llm: FakeLLM, request):
    """Start `llm-ner serve` (gunicorn) against the fake LLM: backend_factory(workers=2, **env); with
    max_file_bytes, no file it writes may grow past that (a full disk). In a test parametrized over the
    engines (`database_url`), the backends share its PostgreSQL database."""
    stack = ExitStack()
    url = engine_url(request)

    def start(workers: int = 2, model_dir: Path | None = None, max_file_bytes: int | None = None, **env: str):
        if url is not None:
            env.setdefault("DATABASE_URL", url)
        environment = backend_env(llm.base_url, model_dir or tmp_path / "model", **env)
        log_path = tmp_path / f"backend-{len(stack._exit_callbacks)}.log"
        return stack.enter_context(run_backend(environment, workers=workers, log_path=log_path, max_file_bytes=max_file_bytes))

    yield start
    stack.close()


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server (Debian's), on a free port in a temp dir, for the session."""
    with run_redis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """REDIS_URL of the session's redis-server, emptied for this test (queues, rate-limit windows)."""
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def worker_factory(tmp_path: Path):
    """Start `llm-ner worker` processes: worker_factory(env, *args) -> Popen (logs in tmp_path/worker-N.log);
    stopped at the end of the test unless the test killed them."""
    stack = ExitStack()
    logs: list[Path] = []

    def start(env: dict[str, str], *args: str):
        log_path = tmp_path / f"worker-{len(logs)}.log"
        logs.append(log_path)
        proc = stack.enter_context(run_worker(env, log_path, *args))
        proc.log_path = log_path
        return proc

    yield start
    stack.close()


EARLY_LABEL_STUDIO = pytest.StashKey[tuple]()


@pytest.hookimpl(trylast=True)  # after -k / -m deselected what will not run
def pytest_collection_modifyitems(session, config, items) -> None:
    """Label Studio takes minutes to start on a loaded machine: when a test of this run needs it, it starts
    now, while the tests before the first of those run, rather than when that test asks for it."""
    if not config.option.collectonly and any("label_studio" in getattr(item, "fixturenames", ()) for item in items):
        stack = ExitStack()
        config.stash[EARLY_LABEL_STUDIO] = (stack, stack.enter_context(started_label_studio()))


def pytest_unconfigure(config) -> None:
    if EARLY_LABEL_STUDIO in config.stash:
        config.stash[EARLY_LABEL_STUDIO][0].close()  # stopped, its data removed


@pytest.fixture(scope="session")
def label_studio(pytestconfig):
    """A real Label Studio 1.23.2 (SQLite, temp dir, 127.0.0.1), shared by the session's tests (started
    when the run was collected)."""
    if EARLY_LABEL_STUDIO in pytestconfig.stash:
        ls = pytestconfig.stash[EARLY_LABEL_STUDIO][1]
        ls.wait_ready()
        yield ls
        return
    with run_label_studio() as ls:
        yield ls


@pytest.fixture
def ls_proxy(label_studio):
    """A proxy of this test's own in front of the session's Label Studio (`ls_proxy.url`); what it
    swallows (forwards, then answers 504) is set by the test (`swallow_prediction_imports`)."""
    proxy = LabelStudioProxy(label_studio.url)
    server = serve(proxy)
    yield proxy
    server.shutdown()
    server.server_close()


@pytest.fixture
def browser():
    """Headless Debian chromium through Playwright (no browser download)."""
    if not CHROMIUM.exists():
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (make test does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def llama_server():
    """llama-cpp-python's OpenAI-compatible server with SmolLM2-135M-Instruct Q4_1, shared by the session."""
    from tests.processes import run_llama_server

    with run_llama_server() as server:
        yield server


# ---- a Label Studio project connected to this backend ----


@dataclass
class LabelStudioProject:
    """A project of the session's Label Studio, made for one test, and the backend connected to it (if any)."""

    label_studio: LabelStudio
    ls: Any  # the SDK client
    project: Any  # the SDK's project
    config: str
    backend: Backend | None = None
    ml: Any = None  # the SDK's ML backend connection

    @property
    def id(self) -> int:
        return self.project.id

    def import_texts(self, texts: list[str]) -> None:
        self.ls.projects.import_tasks(id=self.id, request=[{"text": t} for t in texts])

    def connect(self, backend: Backend, interactive: bool = False, **options: Any) -> Any:
        """Connect `backend` as the project's model, as "Add Model" does in the UI; `options` (e.g. basic
        auth) go to the SDK's ml.create."""
        self.backend = backend
        self.ml = self.ls.ml.create(url=backend.url, project=self.id, title="llm-ner", is_interactive=interactive, **options)
        return self.ml

    def tasks(self) -> list:
        return sorted(self.ls.tasks.list(project=self.id), key=lambda t: t.id)

    def predictions(self, task_id: int) -> list:
        return list(self.ls.predictions.list(task=task_id))

    def open_next_task(self) -> dict:
        return self.label_studio.open_next_task(self.id)

    def model_version(self, **request: Any) -> str:
        """The connected backend's current model_version for this project (what /setup answers)."""
        response = httpx.post(self.backend.url + "/setup", json={"project": str(self.id), "schema": self.config},
                              timeout=60, **request)
        assert response.status_code == 200, response.text
        return response.json()["model_version"]


@pytest.fixture
def connected_project(label_studio, backend_factory):
    """connected_project(texts, title=...): a new NER project in the session's Label Studio, `texts` imported
    as its tasks, and a backend (`backend_factory(workers=2)` unless one is given) connected as its model.

    connect_first=True connects before importing (so Label Studio sends TASKS_CREATED to the backend);
    connect=False leaves the connection to the test (`project.connect(backend)`), e.g. to annotate
    before the backend hears of the project. Other keywords go to `LabelStudioProject.connect`.
    """

    def make(texts: list[str], *, title: str, config: str = NER_CONFIG, backend: Backend | None = None,
             connect: bool = True, connect_first: bool = False, **connect_options: Any) -> LabelStudioProject:
        ls = label_studio.client()
        project = LabelStudioProject(label_studio, ls, ls.projects.create(title=title, label_config=config), config)
        if connect and connect_first:
            project.connect(backend or backend_factory(workers=2), **connect_options)
        project.import_texts(texts)
        if connect and not connect_first:
            project.connect(backend or backend_factory(workers=2), **connect_options)
        assert [t.data["text"] for t in project.tasks()] == list(texts)
        return project

    return make


# ---- talking to an app, reading its answers ----


def predict(client, texts: list[str], *, project: str = "1.1", config: str | None = NER_CONFIG, first_id: int = 1,
            **fields: Any) -> dict:
    """POST /predict with one task per text (ids first_id, first_id + 1, ...): the JSON answer, after
    checking it is a 200 with one result per task. config=None sends no label_config (the project's
    stored one is used); other `fields` go into the request body as they are (e.g. params=...)."""
    tasks = [{"id": first_id + i, "data": {"text": t}} for i, t in enumerate(texts)]
    body = {"tasks": tasks, "project": project, **fields}
    if config is not None:
        body["label_config"] = config
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    assert len(response.json["results"]) == len(texts), response.json
    return response.json


def region_tuples(regions: list[dict], *fields: str) -> list:
    """The regions of a result (pre-labels or annotations) as tuples of the named fields, in order:
    region_tuples(entry["result"], "text", "start", "label") == [("Oslo", 0, "LOC")].

    Fields are keys of the region's value ("start", "end", "text"), or "label", its one label. As with
    operator.itemgetter, a single field gives the values themselves rather than 1-tuples.
    """
    assert fields, "name the fields to compare"

    def get(region: dict, name: str):
        if name == "label":
            (label,) = region["value"]["labels"]
            return label
        return region["value"][name]

    rows = [tuple(get(region, name) for name in fields) for region in regions]
    return [row[0] for row in rows] if len(fields) == 1 else rows


def region_tuples_per_task(answer: dict, *fields: str) -> list[list | None]:
    """`region_tuples` of every task of a /predict answer, in task order; None for a task the answer
    leaves unanswered (`[]`: its pre-labels failed, Label Studio stores nothing and asks again)."""
    return [None if entry == [] else region_tuples(entry["result"], *fields) for entry in answer["results"]]


def metric(name: str, **labels: str) -> float:
    """One sample of this process's Prometheus registry (0 before the first count). Counters add up
    over the whole test session: compare a value with the one read before the action."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def shown_examples(request_body: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    """(example text, its entities) for every prior user/assistant exchange of one LLM request."""
    messages = request_body["messages"]
    pairs = []
    for user, assistant in zip(messages[1:-1:2], messages[2:-1:2]):
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        text = user["content"].split("<text>\n", 1)[1].rsplit("\n</text>", 1)[0]
        pairs.append((text, [(e["text"], e["label"]) for e in json.loads(assistant["content"])["entities"]]))
    return pairs


# ---- what Label Studio 1.23 sends to /webhook (PROTOCOL.md), trimmed to the fields that matter ----

PROJECT_TOKEN = "project-token-9f8e7d6c5b4a"  # what Label Studio puts in project.token; must never be logged


def span(text: str, surface: str, label: str, start: int | None = None, end: int | None = None, **extra) -> dict:
    """A labels region an annotator drew over `surface` (its first occurrence unless start/end are given)."""
    start = text.index(surface) if start is None else start
    end = start + len(surface) if end is None else end
    return {"from_name": "label", "to_name": "text", "type": "labels", "origin": "manual",
            "value": {"start": start, "end": end, "text": surface, "labels": [label]}, **extra}


def annotation_event(action, annotation_id, task_id, text, result, updated_at="2025-01-01T10:00:00Z", was_cancelled=False, project=7):
    return {
        "action": action,
        "annotation": {"id": annotation_id, "task": task_id, "result": result, "was_cancelled": was_cancelled,
                       "ground_truth": False, "completed_by": 1, "updated_at": updated_at, "lead_time": 3.2},
        "task": {"id": task_id, "data": {"text": text}, "is_labeled": True},
        "project": {"id": project, "label_config": NER_CONFIG, "token": PROJECT_TOKEN, "title": "p"},
    }


def deleted_event(*ids, project=7):
    return {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in ids],
            "project": {"id": project, "label_config": NER_CONFIG, "token": PROJECT_TOKEN}}


# ---- Wikigold ----


def wikigold_slice(tmp_path: Path, documents: int) -> Path:
    """The first `documents` documents of wikigold (DOCSTART lines end its documents)."""
    lines, seen = [], 0
    for line in WIKIGOLD.read_text(encoding="utf-8").splitlines():
        lines.append(line)
        if line.startswith("-DOCSTART-"):
            seen += 1
            if seen == documents:
                break
    path = tmp_path / "slice.conll"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def gazetteer_for(units, drop_label: str) -> dict[str, str]:
    """Gold surfaces as an imperfect LLM would know them: one label forgotten, one surface mislabelled.

    Only surfaces that start and end with a letter or digit, have one gold label, and contain no
    other chosen surface, so that `gazetteer_spans` can compute the expected spans independently.
    """
    labels: dict[str, set[str]] = {}
    for unit in units:
        for entity in unit.entities:
            labels.setdefault(entity.text, set()).add(entity.label)
    chosen = {
        s: next(iter(ls)) for s, ls in labels.items()
        if len(ls) == 1 and s[0].isalnum() and s[-1].isalnum() and next(iter(ls)) != drop_label
    }
    chosen = {s: l for s, l in chosen.items() if not any(o != s and re.search(rf"(?<!\w){re.escape(o)}(?!\w)", s) for o in chosen)}
    mislabelled = next(s for s, l in chosen.items() if l == "LOC")
    chosen[mislabelled] = "ORG"
    return chosen


def gazetteer_spans(text: str, gazetteer: dict[str, str]) -> set[tuple[int, int, str]]:
    """(start, end, label) of every whole-word occurrence of a gazetteer surface: what the fake LLM answers."""
    return {
        (m.start(), m.end(), label)
        for surface, label in gazetteer.items()
        for m in re.finditer(rf"(?<!\w){re.escape(surface)}(?!\w)", text)
    }


# ---- project jobs (test_prelabel_job, test_rq_jobs, test_batch_api) ----
JOB_GAZETTEER = {"Ada Lovelace": "PER", "Oslo": "LOC", "Royal Society": "ORG"}


def job_texts(n: int, word: str = "Note") -> list[str]:
    """n task texts, three in four naming every JOB_GAZETTEER surface, the others none."""
    return [f"{word} {i}: Ada Lovelace wrote to the Royal Society from Oslo." if i % 4 else f"{word} {i}: nothing here." for i in range(n)]


def job_auth(backend) -> dict[str, str]:
    """What a caller of POST/DELETE /jobs proves in verified mode (protocol/trust.py): a Label Studio
    user's key that reaches the project; here the one the backend itself was given."""
    return {"Authorization": f"Token {backend.env['LABEL_STUDIO_API_KEY']}"}


def predictions_written(project) -> int:
    return len(list(project.ls.predictions.list(project=project.id)))  # one call for the whole project


def predictions_by_task(project, tasks: list | None = None) -> dict[int, list]:
    """Each task of the project (or of `tasks`) -> the predictions Label Studio holds for it, read in one
    call for the whole project: one call per task took ~90 ms each on a loaded machine, and some
    projects here have 300 tasks."""
    held: dict[int, list] = {task.id: [] for task in (project.tasks() if tasks is None else tasks)}
    for prediction in project.ls.predictions.list(project=project.id):
        assert prediction.task in held, f"a prediction of task {prediction.task}, not one of the project's"
        held[prediction.task].append(prediction)
    return held


def assert_exact(project, version: str) -> None:
    """Every task holds exactly one prediction, of `version`, with JOB_GAZETTEER's spans."""
    tasks = project.tasks()
    held = predictions_by_task(project, tasks)
    assert tasks
    for task in tasks:
        (prediction,) = held[task.id]
        assert prediction.model_version == version
        assert set(region_tuples(prediction.result, "start", "end", "label")) == gazetteer_spans(task.data["text"], JOB_GAZETTEER)


# ---- the llm-ner command and Label Studio projects it makes ----
def run_cli(llm, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`llm-ner ARGS` on the fake LLM, settings from `env`."""
    environment = backend_env(llm.base_url, Path("/nonexistent"), **env)
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`llm-ner ARGS` with no LABEL_STUDIO_* or OPENAI_* from the environment but `env`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "OPENAI_"))}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=600)


def ls_args(label_studio) -> list[str]:
    return ["--label-studio-url", label_studio.url, "--api-key", label_studio.token]


def stored(result) -> set[tuple[int, int, str]]:
    return set(region_tuples(result, "start", "end", "label"))


def plain(item) -> dict:
    # the SDK gives annotations as dicts but predictions as pydantic models
    return item if isinstance(item, dict) else item.model_dump()


def predictions(task) -> list[dict]:
    return [plain(p) for p in task.predictions]


def tasks_of(client, project_id: int):
    return sorted(client.tasks.list(project=project_id), key=lambda t: t.id)


def project_id_from(output: str) -> int:
    # "created project 7: imported ..."
    return int(output.split("project ", 1)[1].split(":", 1)[0])


def figures(output):
    """The estimate's table: a name padded to 16 characters, then its value."""
    return {line[:16].strip(): line[16:].strip() for line in output.strip().splitlines()}


def cli_on_fake(llm: FakeLLM, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`llm-ner ARGS` on the fake LLM with MODEL_DIR at tmp_path/"model" (so a test can show that a
    command never created it) and quick retries; `env` adds or overrides settings."""
    return cli(*args, env=backend_env(llm.base_url, tmp_path / "model", LLM_RETRY_BASE="0.01", **env))


# ---- compare, simulate and their reports ----

# USD per 1M prompt / completion tokens for every fake-* model (LLM_PRICES matches a name's prefix)
FAKE_PRICES = '{"fake": [0.15, 0.6]}'


def write_config(tmp_path: Path, name: str, text: str) -> Path:
    """A configuration file for `compare` / `simulate`: tmp_path/NAME.env holding `text`."""
    path = tmp_path / f"{name}.env"
    path.write_text(text, encoding="utf-8")
    return path


def gazetteer_figures(units, gazetteer: dict[str, str]) -> tuple[float, float, float, int, int]:
    """Micro strict P, R, F1, gold and predicted entities of the fake's gazetteer answers on these
    CoNLL units, computed without the scorer."""
    gold = [{(e.start, e.end, e.label) for e in u.entities} for u in units]
    predicted = [gazetteer_spans(u.text, gazetteer) for u in units]
    correct = sum(len(g & p) for g, p in zip(gold, predicted))
    n_gold, n_pred = sum(map(len, gold)), sum(map(len, predicted))
    return correct / n_pred, correct / n_gold, 2 * correct / (n_gold + n_pred), n_gold, n_pred


VOID_TAGS = {"meta", "img", "br", "hr", "link", "input", "col", "wbr", "source"}


def check_html_report(path: Path) -> list:
    """Parse a report written by --html: well nested, self-contained (no external resource), and its
    plots real PNG images of some size with more than a handful of colours. Returns the images (PIL)."""
    import base64
    import io
    from html.parser import HTMLParser

    from PIL import Image

    class Checker(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack: list[str] = []
            self.images: list[tuple[str, str]] = []  # (alt, src)
            self.external: list[str] = []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            for name in ("src", "href"):
                if attrs.get(name) and not attrs[name].startswith("data:"):
                    self.external.append(attrs[name])
            if tag == "img":
                self.images.append((attrs.get("alt") or "", attrs.get("src") or ""))
            if tag not in VOID_TAGS:
                self.stack.append(tag)

        def handle_endtag(self, tag):
            assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
            self.stack.pop()

    checker = Checker()
    checker.feed(path.read_text(encoding="utf-8"))
    checker.close()
    assert checker.stack == [], f"unclosed tags: {checker.stack}"
    assert checker.external == [], f"the report loads external resources: {checker.external}"
    images = []
    for alt, src in checker.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), alt
        image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))
        image.load()
        assert image.format == "PNG"
        assert image.width >= 400 and image.height >= 150, (alt, image.size)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50, f"{alt}: a nearly blank plot ({len(colours or [])} colours)"
        images.append((alt, image))
    return images


# ---- golden files: exact expected output, kept in tests/golden/ ----


def assert_golden(name: str, text: str) -> None:
    """`text` must equal the file tests/golden/<name> exactly (a diff is shown otherwise).

    UPDATE_GOLDEN=1 writes the file instead (after an intended change; review the diff before committing)."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1 to write it, then review it"
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), f"golden/{name}", "rendered"))
        raise AssertionError(f"the rendered output differs from tests/golden/{name} (UPDATE_GOLDEN=1 rewrites it):\n{diff}")


def transcript(messages: list[dict[str, str]]) -> str:
    """Chat messages as one readable text, for golden files: each turn under a `===== role =====` line."""
    return "".join(f"===== {m['role']} =====\n{m['content']}\n" for m in messages)

