from __future__ import annotations

from pathlib import Path

import pytest

from tests.fake_llm import FakeLLM
from tests.processes import TEST_API_KEY, backend_env, run_backend, run_label_studio

WIKIGOLD = Path(__file__).resolve().parent / "data" / "wikigold" / "wikigold.conll.txt"
# small Chinese samples written for this project (tests/data/zh/README.md)
ZH_DATA = Path(__file__).resolve().parent / "data" / "zh"

NER_CONFIG = """<View>
  <Labels name="label" toName="text">
    <Label value="PER" background="red" hint="people, including fictional"/>
    <Label value="ORG" background="blue"/>
    <Label value="LOC" background="green"/>
    <Label value="MISC" background="orange"/>
  </Labels>
  <Text name="text" value="$text"/>
</View>"""


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


@pytest.fixture
def make_settings(tmp_path: Path, llm: FakeLLM):
    """Settings for an app on the fake LLM: make_settings(**fields) overrides any Settings field."""
    from backend.infra.settings import load_settings

    def make(**overrides):
        values = dict(
            openai_api_key=TEST_API_KEY, openai_base_url=llm.base_url, llm_model="fake-model",
            model_dir=tmp_path / "model", llm_retry_base=0.01, _env_file=None,
        )
        values.update(overrides)
        return load_settings(**values)

    return make


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


def predict_texts(client, texts, project="1.1", config=NER_CONFIG) -> list[dict]:
    """POST /predict with one task per text (ids 1..n); the results, after checking the answer is 200."""
    tasks = [{"id": i + 1, "data": {"text": t}} for i, t in enumerate(texts)]
    response = client.post("/predict", json={"tasks": tasks, "project": project, "label_config": config})
    assert response.status_code == 200, response.json
    return response.json["results"]


@pytest.fixture
def app(settings):
    from backend.protocol.server import create_app

    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def backend_factory(tmp_path: Path, llm: FakeLLM):
    """Start `llm-ner serve` (gunicorn) against the fake LLM: backend_factory(workers=2, **env)."""
    from contextlib import ExitStack

    stack = ExitStack()

    def start(workers: int = 2, model_dir: Path | None = None, **env: str):
        environment = backend_env(llm.base_url, model_dir or tmp_path / "model", **env)
        return stack.enter_context(run_backend(environment, workers=workers, log_path=tmp_path / f"backend-{len(stack._exit_callbacks)}.log"))

    yield start
    stack.close()


@pytest.fixture(scope="session")
def label_studio():
    """A real Label Studio 1.23.2 (SQLite, temp dir, 127.0.0.1), shared by the session's tests."""
    with run_label_studio() as ls:
        yield ls
