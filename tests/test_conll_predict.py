"""`llm-ner predict-conll`: the backend's pipeline on a CoNLL file, without Label Studio (fake LLM)."""

from __future__ import annotations

import json
import re

import pytest

from backend.tools.conll import build_units, read_conll
from tests.conftest import gazetteer_for, gazetteer_spans, run_cli, wikigold_slice
from tests.processes import TEST_API_KEY


def test_predict_conll_labels_wikigold_with_the_backend_pipeline_and_scores_it(tmp_path, llm):
    source = wikigold_slice(tmp_path, 4)
    units = build_units(read_conll(source))
    llm.gazetteer = gazetteer_for(units, drop_label="MISC")
    out, figures = tmp_path / "out.conll", tmp_path / "figures.json"

    done = run_cli(llm, "predict-conll", str(source), "--out", str(out), "--json", str(figures), "--quiet")

    assert done.returncode == 0, done.stderr
    # one LLM call per document, on the very text import-conll would create
    assert len(llm.requests) == len(units)
    prompts = [r["messages"][-1]["content"] for r in llm.requests]
    for unit in units:
        assert sum(unit.text in p for p in prompts) == 1
    # independent computation of what a perfect pipeline makes of this gazetteer, then of the figures
    gold = [{(e.start, e.end, e.label) for e in u.entities} for u in units]
    predicted = [gazetteer_spans(u.text, llm.gazetteer) for u in units]
    correct = sum(len(g & p) for g, p in zip(gold, predicted))
    precision = correct / sum(map(len, predicted))
    recall = correct / sum(map(len, gold))
    report = json.loads(figures.read_text())
    assert report["micro"]["strict"]["precision"] == pytest.approx(precision)
    assert report["micro"]["strict"]["recall"] == pytest.approx(recall)
    assert report["per_label"]["MISC"]["strict"]["recall"] == 0.0
    assert 0 < recall < precision < 1
    assert f"{recall:.3f}" in done.stdout and "micro" in done.stdout and "macro" in done.stdout
    # the written file: tokens and gold tags as read, predicted tags (IOB2) giving the predicted spans
    written = read_conll(out)
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(written) == len(units)
    for unit, doc, spans in zip(units, written, predicted):
        assert [s.words for s in doc.sentences] == [s.words for s in unit.sentences]
        assert [[lines[t.line - 1].split()[1] for t in s.tokens] for s in doc.sentences] == [s.tags for s in unit.sentences]
        again = build_units([doc])[0]
        assert again.text == unit.text
        # a span cutting a token ("Obama" in "Obama's") tags the whole token
        tokens = [t for sentence in unit.token_spans for t in sentence]
        snapped = set()
        for start, end, label in spans:
            covered = [(a, b) for a, b in tokens if a < end and start < b]
            snapped.add((covered[0][0], covered[-1][1], label))
        assert {(e.start, e.end, e.label) for e in again.entities} == snapped
    assert TEST_API_KEY not in done.stdout + done.stderr


def test_predict_conll_per_sentence_sends_one_text_per_sentence(tmp_path, llm):
    source = tmp_path / "two.conll"
    source.write_text("Ada\tB-PER\nsmiled\tO\n\nParis\tB-LOC\nwaited\tO\n", encoding="utf-8")
    llm.gazetteer = {"Ada": "PER", "Paris": "LOC"}
    out = tmp_path / "out.conll"
    done = run_cli(llm, "predict-conll", str(source), "--out", str(out), "--per", "sentence", "--scheme", "BIOES", "--quiet")
    assert done.returncode == 0, done.stderr
    assert sorted(r["messages"][-1]["content"].count("Paris") for r in llm.requests) == [0, 1]
    assert out.read_text().splitlines() == ["Ada B-PER S-PER", "smiled O O", "", "Paris B-LOC S-LOC", "waited O O", ""]
    assert "1.000" in done.stdout


def test_predict_conll_without_gold_tags_needs_labels_and_then_writes_two_columns(tmp_path, llm):
    source = tmp_path / "raw.conll"
    source.write_text("Ada O\nsmiled O\n", encoding="utf-8")
    out = tmp_path / "out.conll"
    refused = run_cli(llm, "predict-conll", str(source), "--out", str(out), "--quiet")
    assert refused.returncode == 1
    assert "--labels" in refused.stderr and "Traceback" not in refused.stderr
    llm.gazetteer = {"Ada": "PER"}
    done = run_cli(llm, "predict-conll", str(source), "--out", str(out), "--labels", "PER,LOC", "--quiet")
    assert done.returncode == 0, done.stderr
    assert out.read_text().splitlines() == ["Ada B-PER", "smiled O", ""]
    assert "micro" not in done.stdout


def test_predict_conll_stops_on_a_malformed_file_before_calling_the_llm(tmp_path, llm):
    source = tmp_path / "bad.conll"
    source.write_text("Ada B-PER\nsmiled\n", encoding="utf-8")
    done = run_cli(llm, "predict-conll", str(source), "--out", str(tmp_path / "out.conll"), "--quiet")
    assert done.returncode == 1
    assert f"{source}:2: one column" in done.stderr and "Traceback" not in done.stderr
    assert llm.requests == []
    assert not (tmp_path / "out.conll").exists()


def test_predict_conll_reports_llm_failures_without_losing_the_other_tasks(tmp_path, llm):
    from tests.fake_llm import Reply

    source = tmp_path / "two.conll"
    source.write_text("Ada B-PER\n\n-DOCSTART- O\n\nParis B-LOC\n", encoding="utf-8")

    def responder(body):
        text = body["messages"][-1]["content"]
        if "Paris" in text:
            return Reply(status=400, error_message="bad request")
        return llm.gazetteer_reply(body)

    llm.gazetteer = {"Ada": "PER", "Paris": "LOC"}
    llm.responder = responder
    out = tmp_path / "out.conll"
    done = run_cli(llm, "predict-conll", str(source), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "(1 failed)" in done.stdout
    assert out.read_text().splitlines() == ["-DOCSTART- O O", "", "Ada B-PER B-PER", "", "-DOCSTART- O O", "", "Paris B-LOC O", ""]


@pytest.mark.parametrize("level, shown", [("WARNING", True), ("ERROR", False)])
def test_predict_conll_logs_through_logging_at_log_level_above_the_progress_bar(tmp_path, llm, level, shown):
    from tests.fake_llm import Reply

    source = tmp_path / "two.conll"
    source.write_text("Ada B-PER\n\nParis B-LOC\n", encoding="utf-8")
    llm.gazetteer = {"Ada": "PER"}
    llm.responder = lambda body: Reply(status=400, error_message="bad") if "Paris" in body["messages"][-1]["content"] else llm.gazetteer_reply(body)
    done = run_cli(llm, "predict-conll", str(source), "--out", str(tmp_path / "out.conll"), "--per", "sentence", LOG_LEVEL=level)
    assert done.returncode == 0 and "(1 failed)" in done.stdout
    assert "pre-labeling" in done.stderr  # the progress bar was drawn
    logged = [line for line in done.stderr.split("\n") if "WARNING" in line]
    assert any("two.conll#d0.s1: no pre-labels" in line for line in logged) == shown
    assert bool(logged) == shown
    for line in logged:
        # in the log format, on a line of its own: the bar was cleared before it, not written through
        assert re.match(r"\d{4}-\d\d-\d\d [\d:,]+ WARNING \d+ backend\.", line.split("\r")[-1]), line
