"""The backend against a real OpenAI-compatible server with a real model, with its DEFAULT settings:
llama-cpp-python's server (`python -m llama_cpp.server`, 2 threads) with SmolLM2-135M-Instruct Q4_1.

A 135M model cannot judge quality: these tests assert the protocol (every task answered, valid JSON
under the schema, exact spans, span scores), never F1.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests.conftest import NER_CONFIG, WIKIGOLD
from tests.processes import LLAMA_MODEL_NAME, REPO, TEST_API_KEY, backend_env, run_backend

pytestmark = pytest.mark.real_llm

SENTENCES = [
    "Angela Merkel visited Paris in 2015.",
    "Microsoft was founded by Bill Gates in Albuquerque.",
    "The Danube flows through Vienna and Budapest.",
    "Barack Obama met the Dalai Lama at the White House.",
    "It rained all day.",
]
LABELS = {"PER", "ORG", "LOC", "MISC"}


def default_env(llama_server, model_dir: Path) -> dict[str, str]:
    """The backend's environment with every LLM setting at its default (the probe included)."""
    env = backend_env(llama_server.base_url, model_dir, LLM_MODEL=LLAMA_MODEL_NAME)
    del env["LLM_PROBE"]  # the fake's tests turn it off; here it runs, as shipped
    return env


def predict_sentences(backend, timeout: float) -> list:
    """/predict of SENTENCES, one task each: the results, after checking the answer is a 200."""
    tasks = [{"id": i + 1, "data": {"text": text}} for i, text in enumerate(SENTENCES)]
    response = httpx.post(
        backend.url + "/predict", json={"tasks": tasks, "project": "1.1", "label_config": NER_CONFIG}, timeout=timeout
    )
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_predict_through_gunicorn_answers_every_task_with_exact_scored_spans(llama_server, tmp_path):
    with run_backend(default_env(llama_server, tmp_path / "model"), workers=2, log_path=tmp_path / "backend.log") as backend:
        setup = httpx.post(backend.url + "/setup", json={"project": "1", "schema": NER_CONFIG}, timeout=30)
        assert setup.status_code == 200
        results = predict_sentences(backend, timeout=150)
        log = backend.log()
    assert len(results) == len(SENTENCES)
    assert "no pre-labels" not in log, log[-3000:]  # no failed task: each one got the LLM's answer
    assert all(isinstance(entry, dict) for entry in results)  # (a failed one would be `[]`)
    # the probe found what this server does, and the backend used it
    probe_line = next(line for line in log.splitlines() if "LLM endpoint" in line and "structured output" in line)
    assert "structured output json_object with a schema" in probe_line and "json_schema rejected (HTTP 500" in probe_line
    assert "logprobs returned" in probe_line
    regions = [(text, region) for text, entry in zip(SENTENCES, results) for region in entry["result"]]
    assert regions, "the model labelled nothing in five sentences"
    for text, region in regions:
        value = region["value"]
        assert text[value["start"] : value["end"]] == value["text"] and set(value["labels"]) <= LABELS
        assert 0 <= region["score"] <= 1  # span scores from the server's logprobs (rounded: 0 for unlikely ones)
    labelled = [entry for entry in results if entry["result"]]
    # a task is as doubtful as its most doubtful span
    assert all(entry["score"] == min(r["score"] for r in entry["result"]) for entry in labelled)


def test_every_answer_is_valid_json_under_the_tasks_schema(llama_server, tmp_path):
    from backend.infra.settings import load_settings
    from backend.llm.client import LLMClient
    from backend.llm.probe import probe_for
    from backend.ner.labelconfig import parse_label_config
    from backend.ner.task import NerTask
    from backend.ner.templates import load_templates

    settings = load_settings(
        openai_api_key=TEST_API_KEY, openai_base_url=llama_server.base_url, llm_model=LLAMA_MODEL_NAME,
        model_dir=tmp_path / "model", _env_file=None,
    )
    llm = LLMClient(settings, prober=probe_for)
    task = NerTask(parse_label_config(NER_CONFIG).targets[0], load_templates(settings.prompts_dir))
    schema = task.json_schema()["schema"]
    for text in SENTENCES:
        completion = llm.complete(task.messages(text), task.json_schema(), max_tokens=llm.answer_tokens(len(text)))
        assert completion.mode == "json_object_schema"
        assert completion.choices[0].finish_reason == "stop", completion.content
        jsonschema.validate(json.loads(completion.content), schema)
        assert completion.choices[0].logprobs


def wikigold_sentences(path: Path, count: int) -> Path:
    """The first `count` sentences of wikigold, as a CoNLL file."""
    sentences, current = [], []
    for line in WIKIGOLD.read_text(encoding="utf-8").splitlines():
        if line.startswith("-DOCSTART-"):
            continue
        if not line.strip():
            if current:
                sentences.append(current)
                current = []
            if len(sentences) == count:
                break
            continue
        current.append(line)
    path.write_text("\n\n".join("\n".join(s) for s in sentences) + "\n", encoding="utf-8")
    return path


def test_predict_conll_with_default_settings_fails_no_task(llama_server, tmp_path):
    source = wikigold_sentences(tmp_path / "six.conll", 6)
    out = tmp_path / "out.conll"
    env = default_env(llama_server, tmp_path / "model")
    done = subprocess.run(
        [sys.executable, "-m", "backend", "predict-conll", str(source), "--out", str(out), "--per", "sentence", "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"6 tasks pre-labeled with {LLAMA_MODEL_NAME} (0 failed)" in done.stdout
    assert "no pre-labels" not in done.stderr
    # the probe's one line, through logging (LOG_LEVEL=INFO), in its format
    assert re.search(r"INFO \d+ backend\.llm\.probe: LLM endpoint .* json_object with a schema", done.stderr)
    written = [line.split() for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    read = [line.split() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert [w[:2] for w in written] == [r[:1] + r[-1:] for r in read]  # token and gold tag, as read
    assert all(w[2] == "O" or w[2][2:] in LABELS for w in written)


def test_doctor_reports_what_the_server_does_and_what_the_backend_will_use(llama_server, tmp_path):
    env = default_env(llama_server, tmp_path / "model")
    done = subprocess.run([sys.executable, "-m", "backend", "doctor"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"json_schema\s+rejected: HTTP 500", out)
    assert re.search(r"json_object with a schema\s+works", out)
    assert re.search(r"logprobs\s+returned", out) and re.search(r"n\s+ignored", out)
    # it runs one request at a time (a lock around the model)
    assert re.search(r"concurrency\s+1 request at once", out) and re.search(r"latency\s+\d+\.\d\d s", out)
    assert re.search(r"the backend uses\s+structured output: json_object with a schema", out)
    assert re.search(r"entity texts\s+constrained to spans of the task text \(json_object_schema", out)
    assert "span scores from logprobs" in out and "PREDICT_CONCURRENCY=1" in out


def test_constrained_entity_texts_store_only_exact_spans_of_each_task(llama_server, tmp_path):
    """Issue 27: SmolLM2 copied the prompt's placeholders (`"<exact text>"`) and whole sentences, and
    31 of 39 tasks were stored as "no entities". With entity texts constrained to spans of the text,
    every task is answered, and every stored span is the task's own text at its offsets."""
    from backend.ner.constraints import MAX_TOKENS, candidates

    # generous: a loaded 2-core machine runs this one request at a time, several seconds each
    env = default_env(llama_server, tmp_path / "model") | {"PREDICT_DEADLINE": "900", "LLM_TIMEOUT": "300"}
    with run_backend(env, workers=1, log_path=tmp_path / "backend.log") as backend:
        results = predict_sentences(backend, timeout=1000)
        log = backend.log()
    # (json_object_schema once the probe has found it; json_schema, then the fallback, when the probe
    # could not finish on a loaded machine: the same enum either way)
    assert "entity texts constrained to spans of the text (" in log, log[-3000:]
    assert "entity texts not constrained" not in log
    assert "no pre-labels" not in log and all(isinstance(entry, dict) for entry in results), log[-3000:]
    regions = [(text, region["value"]) for text, entry in zip(SENTENCES, results) for region in entry["result"]]
    assert regions, "the model labelled nothing in five sentences"
    for text, value in regions:
        assert text[value["start"] : value["end"]] == value["text"] and value["text"] in candidates(text, MAX_TOKENS, names=True)
        assert "<" not in value["text"] and set(value["labels"]) <= LABELS


def wikigold_words(chars: int) -> str:
    """About `chars` characters of wikigold's first documents, their tokens joined by spaces."""
    words: list[str] = []
    for line in WIKIGOLD.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("-DOCSTART-"):
            words.append(line.split()[0])
            if sum(len(w) + 1 for w in words) >= chars:
                break
    return " ".join(words)


@pytest.mark.timeout(1800)  # a few chunks, a few hundred tokens each, on a loaded 2-core machine
def test_a_document_longer_than_the_servers_context_window_is_prelabeled_in_chunks_that_fit(tmp_path, caplog):
    """llama-cpp-python's server answers a prompt past its window (`--n_ctx`, 2,048 tokens unless set)
    with a 400: the document failed, and was tried again as it was. Here a 1,024-token window and a
    ~4,000-character document (~1,000 tokens of text alone): one 400, whose window cuts the text into
    chunks the server answers. (Whether a 135M model finds entities in them is not asserted: its
    answers may name none of the text, and the task then fails for that, never for its length.)"""
    import logging

    from backend.infra.settings import load_settings
    from backend.protocol.server import create_app
    from tests.processes import run_llama_server

    text = wikigold_words(4000)
    caplog.set_level(logging.INFO)
    with run_llama_server(extra=["--n_ctx", "1024"]) as server:
        # generous times: a 2-core machine shared with other work generates a few tokens a second
        settings = load_settings(
            openai_api_key=TEST_API_KEY, openai_base_url=server.base_url, llm_model=LLAMA_MODEL_NAME,
            model_dir=tmp_path / "model", llm_timeout=300, llm_max_tokens=128, predict_deadline=1800, _env_file=None,
            # the plain schema: a grammar spelling hundreds of candidate texts is slow to sample (and the
            # constrained mode has tests of its own)
            constrain_entity_texts=False,
        )
        client = create_app(settings).test_client()
        response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"text": text}}], "project": "1.1",
                                                 "label_config": NER_CONFIG})
        served = re.findall(r'"POST /v1/chat/completions HTTP/1.1" (\d+)', server.log_path.read_text(errors="replace"))
    assert response.status_code == 200, response.json
    (entry,) = response.json["results"]
    messages = [r.getMessage() for r in caplog.records]
    resplits = [m for m in messages if "context window (1024 tokens) is too small" in m]
    assert len(resplits) == 1, messages[-20:]
    # the probe's json_schema 500, then one 400 (the whole text), then every chunk answered
    assert served.count("400") == 1 and "400" not in served[served.index("400") + 1 :], served
    assert served[served.index("400") + 1 :].count("200") >= 3, served
    assert not any("does not fit" in m or "context_length" in m for m in messages), messages[-20:]
    for region in entry["result"] if isinstance(entry, dict) else []:
        value = region["value"]
        assert text[value["start"] : value["end"]] == value["text"] and set(value["labels"]) <= LABELS
