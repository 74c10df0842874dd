"""`llm-ner simulate`: the learning curve of the fit() loop on Wikigold, with a fake LLM that gets better
with every few-shot example in its prompt."""

from __future__ import annotations

import json

import pytest

from backend.tools.conll import build_units, read_conll
from tests.conftest import check_html_report, cli_on_fake, gazetteer_for, gazetteer_spans, wikigold_slice
from tests.fake_llm import few_shot_count, surface_rank

# share of the gazetteer the fake knows with 0, 1, 2, 3 and 4 or more examples in the prompt
SKILL = (0.15, 0.35, 0.55, 0.75, 1.0)
K = 4  # FEW_SHOT_K


def strict_f1(units, gazetteer) -> float:
    gold = [{(e.start, e.end, e.label) for e in u.entities} for u in units]
    predicted = [gazetteer_spans(u.text, gazetteer) for u in units]
    correct = sum(len(g & p) for g, p in zip(gold, predicted))
    return 2 * correct / (sum(map(len, gold)) + sum(map(len, predicted)))


def test_simulate_draws_a_rising_learning_curve_from_corrections_replayed_into_a_throwaway_store(tmp_path, llm):
    units = build_units(read_conll(wikigold_slice(tmp_path, 6)), per="sentence")
    llm.gazetteer = gazetteer_for(units, drop_label="MISC")
    llm.skill = lambda examples: SKILL[min(examples, len(SKILL) - 1)]
    figures, report = tmp_path / "curve.json", tmp_path / "curve.html"

    done = cli_on_fake(llm, tmp_path, "simulate", str(tmp_path / "slice.conll"), "--per", "sentence", "--limit", "40",
                   "--seed", "2", "--holdout", "15", "--schedule", "0,1,2,3,4,8", "--target", "0.6",
                   "--json", str(figures), "--html", str(report), FEW_SHOT_K=str(K))

    assert done.returncode == 0, done.stderr
    data = json.loads(figures.read_text())
    by_name = {u.name: u for u in units}
    held = [by_name[name] for name in data["holdout_tasks"]]
    assert (len(held), data["stream"]) == (15, 25)
    points = data["points"]
    assert [p["corrections"] for p in points] == [0, 1, 2, 3, 4, 8]
    # every held-out prompt shows as many examples as there are corrections, up to FEW_SHOT_K
    assert [p["examples_per_prompt"] for p in points] == [min(p["corrections"], K) for p in points]
    assert all(few_shot_count(r) <= K for r in llm.requests)
    # the examples shown are corrections replayed so far: tasks outside the held-out part, never one of them
    shown = {m["content"] for r in llm.requests for m in r["messages"][1:-1] if m["role"] == "user"}
    assert shown and not any(u.text in text for u in held for text in shown)
    # each point scored independently: what the fake answers with that many examples, against the gold
    expected = []
    for p in points:
        share = SKILL[min(p["corrections"], K)]
        expected.append(strict_f1(held, {s: l for s, l in llm.gazetteer.items() if surface_rank(s) < share}))
    assert [p["strict_f1"] for p in points] == pytest.approx(expected)
    f1 = [p["strict_f1"] for p in points]
    assert f1[0] < f1[1] < f1[2] < f1[3] < f1[4] == f1[5]  # learning until FEW_SHOT_K examples fit in the prompt
    reached = next(p["corrections"] for p, value in zip(points, expected) if value >= 0.6)
    assert data["reached_at"] == reached and f"reached after {reached} corrections" in done.stdout
    # longer prompts cost more
    tokens = [p["usage"]["prompt_tokens"] for p in points]
    assert tokens[0] < tokens[1] < tokens[2] < tokens[4]
    assert "simulating" in done.stderr  # the progress bar

    images = check_html_report(report)
    assert [alt for alt, _ in images] == ["learning curve", "per-label bars", "error breakdown"]
    assert data["final"]["name"] == "after 8 corrections" and len(data["final"]["worst_tasks"]) <= 5
    # the configured MODEL_DIR, where a project's real examples would be, was never opened
    assert not (tmp_path / "model").exists()


def test_simulate_refuses_a_bad_schedule_or_split_with_a_clear_message(tmp_path, llm):
    source = wikigold_slice(tmp_path, 2)
    cases = [
        (["--schedule", "0,five"], "--schedule must be comma-separated whole numbers"),
        (["--holdout", "2"], "--holdout must be between 1 and 1"),
        (["--schedule", "5,10"], "no schedule point is within the 1 corrections available"),
        (["--target", "1.5"], "--target must be an F1 between 0 and 1"),
    ]
    for extra, message in cases:
        done = cli_on_fake(llm, tmp_path, "simulate", str(source), *extra, "--quiet")
        assert done.returncode == 1, extra
        assert message in done.stderr and "Traceback" not in done.stderr
    one = tmp_path / "one.conll"
    one.write_text("Ada B-PER\nsmiled O\n", encoding="utf-8")
    done = cli_on_fake(llm, tmp_path, "simulate", str(one), "--quiet")
    assert done.returncode == 1 and "simulate needs at least 2 annotated tasks" in done.stderr
    assert llm.requests == []
