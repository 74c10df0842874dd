"""The Batch API's files without a provider: request lines, their split at the per-batch limits,
result lines as OpenAI and `vllm run-batch` write them, the endpoint Azure OpenAI wants, and the
batches' records in the store (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import pytest

from backend.infra.storage import Database
from backend.llm.batch import BatchAnswers, BatchFileError, batch_endpoint, parse_result_line, request_id
from backend.pipeline.jobs.batch import Batches, RequestFiles, batch_price, check_results, result_lines


def body(text: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "temperature": 0.0, "max_tokens": 100}


def test_a_request_id_is_a_hash_of_the_whole_body_whatever_its_key_order():
    assert request_id(body("a")) == request_id(dict(reversed(list(body("a").items()))))
    assert request_id(body("a")) != request_id(body("b"))
    assert request_id(body("a")) != request_id(dict(body("a"), max_tokens=101))


def test_request_files_split_before_the_request_or_byte_limit(tmp_path):
    by_count = RequestFiles(tmp_path, "/v1/chat/completions", max_requests=3, max_bytes=10**6, name="count")
    for i in range(7):
        by_count.add(f"id{i}", body(f"text {i}"))
    by_count.close()
    assert [n for _, n in by_count.files] == [3, 3, 1]
    line = json.loads(by_count.files[0][0].read_text().splitlines()[0])
    assert line == {"custom_id": "id0", "method": "POST", "url": "/v1/chat/completions", "body": body("text 0")}

    size = len(by_count.files[2][0].read_bytes())  # one line
    by_bytes = RequestFiles(tmp_path, "/v1/chat/completions", max_requests=100, max_bytes=2 * size + 1, name="bytes")
    for i in range(5):
        by_bytes.add(f"id{i}", body(f"text {i}"))
    by_bytes.close()
    assert [n for _, n in by_bytes.files] == [2, 2, 1]
    assert all(path.stat().st_size <= 2 * size + 1 for path, _ in by_bytes.files)
    with pytest.raises(BatchFileError, match="more than a batch file may hold"):
        RequestFiles(tmp_path, "/v1/chat/completions", max_requests=100, max_bytes=10).add("big", body("x" * 100))


def test_result_lines_answers_failures_and_unreadable_lines():
    ok = parse_result_line(json.dumps({"custom_id": "a", "response": {"status_code": 200, "body": {"choices": []}}, "error": None}), "f line 1")
    assert ok.answered and ok.error == ""
    failed = parse_result_line(json.dumps({"custom_id": "b", "response": {"status_code": 500, "body": {"error": {"message": "boom"}}}}), "x")
    assert not failed.answered and failed.error == "HTTP 500: boom"
    expired = parse_result_line(json.dumps({"custom_id": "c", "response": None, "error": {"code": "batch_expired", "message": "late"}}), "x")
    assert not expired.answered and expired.error == "batch_expired: late"
    for raw, message in [("nope", "f line 3: not a JSON line"), ("[1]", "a JSON object"), ('{"response": {}}', "no custom_id"),
                         ('{"custom_id": "d"}', "neither a response nor an error"),
                         ('{"custom_id": "d", "response": {"status_code": "200"}}', "status_code is not a number")]:
        with pytest.raises(BatchFileError, match=message):
            parse_result_line(raw, "f line 3")


def test_a_results_file_is_checked_line_by_line_and_the_same_bytes_get_the_same_id(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"custom_id": "a", "response": {"status_code": 200, "body": {"choices": []}}}) + "\n\n")
    first = check_results(path)
    assert (first.lines, first.duplicates) == (1, 0) and [r.custom_id for r in result_lines(path)] == ["a"]
    assert check_results(path).file_id == first.file_id
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(BatchFileError, match="results.jsonl line 3: not a JSON line"):
        check_results(path)


def test_azure_openai_names_the_batch_endpoint_without_v1_and_the_setting_wins():
    assert batch_endpoint(None, None) == "/v1/chat/completions"
    assert batch_endpoint("http://localhost:8000/v1", None) == "/v1/chat/completions"
    assert batch_endpoint("https://team.openai.azure.com/openai/v1", None) == "/chat/completions"
    assert batch_endpoint("https://team.openai.azure.com/openai/v1", "/v1/chat/completions") == "/v1/chat/completions"


def test_the_batch_price_is_half():
    assert batch_price((0.15, 0.6)) == (0.075, 0.3) and batch_price(None) is None


def test_batches_and_their_answers_in_the_store_of_either_engine(database_url, tmp_path):
    db = Database(url=database_url) if database_url else Database.in_dir(tmp_path)
    batches, answers = Batches(db), BatchAnswers(db)
    assert batches.add("batch_a", "7", "v1", "job1", "file-1", 3, "validating")
    assert not batches.add("batch_a", "7", "v1", "job2", "file-2", 3, "validating")  # a batch is recorded once
    assert batches.pending_projects() == [("7", "v1", "job1")]
    batches.status("batch_a", "in_progress")
    completion = {"choices": [{"message": {"content": "{}"}}], "usage": {"prompt_tokens": 1000, "completion_tokens": 500}}
    results = [
        parse_result_line(json.dumps({"custom_id": "r1", "response": {"status_code": 200, "body": completion}}), "x"),
        parse_result_line(json.dumps({"custom_id": "r2", "response": {"status_code": 500, "body": {"error": {"message": "no"}}}}), "x"),
    ]
    tally, first = batches.ingest(answers, "batch_a", "completed", results, (1.0, 2.0), lambda t: f"{t.failed} of 3 lines failed")
    usage = tally.usage
    assert first and (usage.prompt_tokens, usage.completion_tokens, usage.calls) == (1000, 500, 1)
    assert not batches.ingest(answers, "batch_a", "completed", results, (1.0, 2.0))[1]  # accounted once
    (row,) = batches.of("7", "v1", "ingested")
    assert (row["answered"], row["failed"], row["status"], row["message"]) == (1, 1, "completed", "1 of 3 lines failed")
    assert row["sync_cost_usd"] == pytest.approx(0.002) and row["cost_usd"] == pytest.approx(0.001)
    assert answers.answer("r1") == completion and answers.answer("r2") is None and batches.pending_projects() == []
    batches.used(["batch_a"])
    answers.forget(["batch_a"])
    assert answers.answer("r1") is None and batches.of("7", "v1", "ingested") == []


def answer_line(custom_id: str, content: str, status: int = 200, prompt_tokens: int = 100) -> str:
    body = ({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 10, "total_tokens": prompt_tokens + 10}}
            if status == 200 else {"error": {"message": content}})
    return json.dumps({"custom_id": custom_id, "response": {"status_code": status, "body": body}, "error": None}) + "\n"


def test_a_request_named_twice_in_a_results_file_is_stored_and_accounted_once(tmp_path):
    path = tmp_path / "twice.jsonl"
    path.write_text(answer_line("r1", "first") + answer_line("r1", "second") + answer_line("r2", "boom", status=500)
                    + answer_line("r2", "late answer") + answer_line("r2", "third"))
    checked = check_results(path)
    assert (checked.lines, checked.duplicates) == (5, 3)
    db = Database.in_dir(tmp_path)
    batches, answers = Batches(db), BatchAnswers(db)
    batches.add(checked.file_id, "7", "v1", "job1", None, 2, "completed")
    tally, first = batches.ingest(answers, checked.file_id, "completed", result_lines(path), None)
    # each request once: r1's first answer; r2's answer replaces its failed line, the line after it is ignored
    assert first and (tally.lines, tally.answered, tally.failed, tally.duplicates) == (5, 2, 0, 3)
    assert (tally.usage.prompt_tokens, tally.usage.calls) == (200, 2)
    assert answers.answer("r1")["choices"][0]["message"]["content"] == "first"
    assert answers.answer("r2")["choices"][0]["message"]["content"] == "late answer"


def test_reading_and_storing_a_results_file_takes_memory_far_below_its_size(tmp_path):
    import tracemalloc

    path = tmp_path / "big.jsonl"
    content = json.dumps({"entities": [{"text": f"Entity {i}", "label": "ORG"} for i in range(40)]})
    with path.open("w") as out:
        for i in range(6000):
            out.write(answer_line(f"ner-{i:040d}", content))
    size = path.stat().st_size
    assert size > 12 * 1024 * 1024
    db = Database.in_dir(tmp_path)
    batches, answers = Batches(db), BatchAnswers(db)
    tracemalloc.start()
    try:
        checked = check_results(path)
        batches.add(checked.file_id, "7", "v1", "job1", None, checked.lines, "completed")
        tally, _ = batches.ingest(answers, checked.file_id, "completed", result_lines(path), None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tally.answered == 6000 and answers.answer(f"ner-{5999:040d}") is not None
    assert peak < size / 4, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"
