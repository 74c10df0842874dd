"""`llm-ner export sft|preferences`: stored corrections as JSONL in the published tuning formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NER_CONFIG, annotation_event, predict, span
from tests.processes import REPO

TEXT_A = "Jordan signed with the Chicago Bulls in 1984."
TEXT_B = "Paris is lovely in spring."
TEXT_C = "Ada Lovelace wrote notes on the engine."


def run_export(model_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_", "MODEL_DIR"))}
    env["MODEL_DIR"] = str(model_dir)
    return subprocess.run([sys.executable, "-m", "backend", "export", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_openai_chat_format(record: dict) -> None:
    """The checks of OpenAI's chat fine-tuning data format (cookbook: chat_finetuning_data_prep)."""
    assert set(record) == {"messages"}
    messages = record["messages"]
    assert isinstance(messages, list) and messages
    for message in messages:
        assert set(message) <= {"role", "content", "name", "weight", "function_call"}
        assert message["role"] in ("system", "user", "assistant", "function")
        assert isinstance(message["content"], str) and message["content"]
    assert any(m["role"] == "assistant" for m in messages)
    assert messages[-1]["role"] == "assistant"


def check_trl_preference_format(record: dict) -> None:
    """TRL's conversational preference format (DPOTrainer / RewardTrainer datasets): prompt, chosen, rejected."""
    assert set(record) == {"prompt", "chosen", "rejected"}
    for message in record["prompt"]:
        assert set(message) == {"role", "content"} and isinstance(message["content"], str)
    assert record["prompt"][-1]["role"] == "user"
    for side in ("chosen", "rejected"):
        assert [m["role"] for m in record[side]] == ["assistant"]
        assert isinstance(record[side][0]["content"], str)
    assert record["chosen"] != record["rejected"]


def entities(content: str) -> list[tuple[str, str]]:
    return [(e["text"], e["label"]) for e in json.loads(content)["entities"]]


@pytest.fixture
def corrected_project(client, llm, settings):
    """Project 7: the LLM pre-labeled two tasks (Jordan wrongly as ORG); annotators corrected three."""
    assert client.post("/setup", json={"project": "7", "schema": NER_CONFIG}).status_code == 200
    llm.gazetteer = {"Jordan": "ORG", "Chicago Bulls": "ORG"}
    predict(client, [TEXT_A, TEXT_B], project="7.1")
    sent_system_prompt = llm.requests[0]["messages"][0]["content"]
    events = [
        annotation_event("ANNOTATION_CREATED", 11, 1, TEXT_A, [span(TEXT_A, "Jordan", "PER"), span(TEXT_A, "Chicago Bulls", "ORG")]),
        annotation_event("ANNOTATION_CREATED", 12, 2, TEXT_B, []),  # accepted the (empty) draft
        annotation_event("ANNOTATION_CREATED", 13, 3, TEXT_C, [span(TEXT_C, "Ada Lovelace", "PER")]),  # never pre-labeled
    ]
    for event in events:
        assert client.post("/webhook", json=event).status_code == 201
    return settings.model_dir, sent_system_prompt


def test_export_sft_writes_one_chat_record_per_example_with_the_corrected_answer(corrected_project, tmp_path):
    model_dir, system_prompt = corrected_project
    out = tmp_path / "out" / "sft.jsonl"
    done = run_export(model_dir, "sft", "--project", "7", str(out))
    assert done.returncode == 0, done.stderr
    assert "wrote 3 sft records" in done.stdout
    records = read_jsonl(out)
    for record in records:
        check_openai_chat_format(record)
        assert record["messages"][0] == {"role": "system", "content": system_prompt}  # the prompt the backend sends
    assert [entities(r["messages"][-1]["content"]) for r in records] == [
        [("Jordan", "PER"), ("Chicago Bulls", "ORG")], [], [("Ada Lovelace", "PER")]]
    assert [TEXT_A in r["messages"][1]["content"] for r in records] == [True, False, False]


def test_export_preferences_pairs_the_correction_with_the_llm_draft_only_where_they_differ(corrected_project, tmp_path):
    model_dir, system_prompt = corrected_project
    out = tmp_path / "prefs.jsonl"
    done = run_export(model_dir, "preferences", "--project", "7", str(out))
    assert done.returncode == 0, done.stderr
    (record,) = read_jsonl(out)
    check_trl_preference_format(record)
    assert record["prompt"][0]["content"] == system_prompt and TEXT_A in record["prompt"][1]["content"]
    assert entities(record["chosen"][0]["content"]) == [("Jordan", "PER"), ("Chicago Bulls", "ORG")]
    assert entities(record["rejected"][0]["content"]) == [("Jordan", "ORG"), ("Chicago Bulls", "ORG")]


def test_exporting_an_unknown_project_or_store_is_a_clear_error(corrected_project, tmp_path):
    model_dir, _ = corrected_project
    unknown = run_export(model_dir, "sft", "--project", "99", str(tmp_path / "x.jsonl"))
    assert unknown.returncode == 1 and "project 99 is unknown" in unknown.stderr and "Traceback" not in unknown.stderr
    no_store = run_export(tmp_path / "nowhere", "sft", "--project", "7", str(tmp_path / "x.jsonl"))
    assert no_store.returncode == 1 and "MODEL_DIR" in no_store.stderr and "Traceback" not in no_store.stderr
    assert not (tmp_path / "x.jsonl").exists()
    bad_kind = run_export(model_dir, "dpo", "--project", "7", str(tmp_path / "x.jsonl"))
    assert bad_kind.returncode == 2 and "invalid choice" in bad_kind.stderr
