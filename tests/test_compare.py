"""`llm-ner compare`: configurations side by side on Wikigold with the fake LLM, the paired bootstrap, and
configuration files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.infra.errors import ConfigError
from backend.tools.compare import paired_bootstrap
from backend.tools.conll import build_units, read_conll
from backend.tools.diagnosis import micro_f1, task_counts
from backend.tools.runs import load_configuration
from backend.tools.scorer import score
from tests.conftest import (
    FAKE_PRICES,
    check_html_report,
    cli_on_fake,
    gazetteer_figures,
    gazetteer_for,
    gazetteer_spans,
    wikigold_slice,
    write_config,
)
from tests.processes import TEST_API_KEY, free_port


def test_compare_tells_a_worse_configuration_from_noise_on_the_same_wikigold_tasks(tmp_path, llm):
    source = wikigold_slice(tmp_path, 12)
    units = build_units(read_conll(source))
    good = gazetteer_for(units, drop_label="MISC")
    bad = {surface: label for surface, label in good.items() if label != "PER"}  # worse by construction: no people
    llm.model_gazetteers = {"fake-good": good, "fake-bad": bad}
    configs = [
        write_config(tmp_path, "good", f"LLM_MODEL=fake-good\nLLM_PRICES={FAKE_PRICES}\n"),
        write_config(tmp_path, "bad", f"# the same model family, without PER\nLLM_MODEL=fake-bad\nLLM_PRICES={FAKE_PRICES}\n"),
        # identical requests to "good" (labelling every mention or not changes nothing the fake answers)
        write_config(tmp_path, "again", f"LLM_MODEL=fake-good\nLABEL_ALL_MENTIONS=false\nLLM_PRICES={FAKE_PRICES}\n"),
    ]
    figures, report = tmp_path / "compare.json", tmp_path / "compare.html"

    done = cli_on_fake(llm, tmp_path, "compare", str(source), *[a for c in configs for a in ("--config", str(c))],
                   "--limit", "8", "--seed", "3", "--json", str(figures), "--html", str(report))

    assert done.returncode == 0, done.stderr
    data = json.loads(figures.read_text())
    assert [s["name"] for s in data["systems"]] == ["good", "bad", "again"]
    by_name = {u.name: u for u in units}
    chosen = [by_name[name] for name in data["task_names"]]
    assert len(chosen) == 8 and chosen == [u for u in units if u.name in data["task_names"]]  # in file order
    # the same 8 tasks went to both models; "again" asked nothing: its requests were "good"'s, from the shared cache
    for model in ("fake-good", "fake-bad"):
        asked = [r["messages"][-1]["content"] for r in llm.requests if r["model"] == model]
        assert len(asked) == 8 and all(sum(u.text in p for p in asked) == 1 for u in chosen)
    assert len(llm.requests) == 16
    # few-shot examples came from the other tasks of the file, never the task's own text
    for request in llm.requests:
        shown = [m["content"] for m in request["messages"][1:-1] if m["role"] == "user"]
        assert shown and not any(s == request["messages"][-1]["content"] for s in shown)

    systems = {s["name"]: s for s in data["systems"]}
    for name, gazetteer in (("good", good), ("bad", bad), ("again", good)):
        precision, recall, f1, n_gold, n_pred = gazetteer_figures(chosen, gazetteer)
        strict = systems[name]["micro"]["strict"]
        assert (strict["precision"], strict["recall"], strict["f1"]) == pytest.approx((precision, recall, f1))
        assert (strict["gold"], strict["predicted"]) == (n_gold, n_pred)
    assert systems["bad"]["per_label"]["PER"]["strict"]["predicted"] == 0

    # tokens: "again" reports what its answers cost when "good" asked for them, and sent nothing itself
    usage = {name: s["usage"] for name, s in systems.items()}
    assert usage["good"]["prompt_tokens"] > 0 and usage["good"]["sent_prompt_tokens"] == usage["good"]["prompt_tokens"]
    assert usage["again"]["prompt_tokens"] == usage["good"]["prompt_tokens"]
    assert usage["again"]["sent_prompt_tokens"] == 0 and usage["again"]["answers_from_cache"] == 8
    assert usage["good"]["cost_usd"] == pytest.approx(
        (usage["good"]["prompt_tokens"] * 0.15 + usage["good"]["completion_tokens"] * 0.6) / 1e6)
    assert systems["again"]["latency"]["answers"] == 8 and systems["again"]["latency"]["p50"] > 0

    differences = {(d["a"], d["b"], d["metric"]): d for d in data["differences"]}
    worse = differences[("good", "bad", "strict micro F1")]
    assert worse["difference"] == pytest.approx(gazetteer_figures(chosen, good)[2] - gazetteer_figures(chosen, bad)[2])
    assert 0 < worse["low"] <= worse["difference"] <= worse["high"]  # the interval excludes 0
    assert worse["significant"] and worse["verdict"] == "good is better than bad"
    same = differences[("good", "again", "strict micro F1")]
    assert (same["difference"], same["low"], same["high"], same["significant"]) == (0.0, 0.0, 0.0, False)
    assert "good - bad (strict): +" in done.stdout and "good is better than bad" in done.stdout
    assert "good - again (strict): +0.000 [+0.000, +0.000]  noise: the interval contains 0" in done.stdout
    assert "good:" in done.stderr  # a progress bar per configuration

    images = check_html_report(report)
    assert {alt for alt, _ in images} == {"differences", "per-label bars", "error breakdown"}
    html = report.read_text()
    assert "good is better than bad" in html and TEST_API_KEY not in html + figures.read_text() + done.stdout + done.stderr
    assert not (tmp_path / "model").exists()  # nothing written to the configured MODEL_DIR


def test_a_configuration_file_lays_its_settings_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", TEST_API_KEY)
    monkeypatch.setenv("LLM_MODEL", "from-the-environment")
    monkeypatch.setenv("FEW_SHOT_K", "7")
    path = write_config(tmp_path, "cheap", 'llm_model=from-the-file\nexport PACK_SIZE=8\nLLM_PRICES={"x": [1, 2]}\n')
    configuration = load_configuration(path)
    settings = configuration.settings
    assert configuration.name == "cheap"
    assert (settings.llm_model, settings.pack_size, settings.few_shot_k) == ("from-the-file", 8, 7)
    assert settings.llm_prices == {"x": (1.0, 2.0)}
    assert "key" not in json.dumps(configuration.describe()).lower()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("LLM_MODEL=x\nFEW_SHOTS_K=3\n", "bad.env:2: unknown setting FEW_SHOTS_K (did you mean FEW_SHOT_K?)"),
        ("LLM_MODEL=x\nthis is not a setting\n", "bad.env:2: not a NAME=value line"),
        ("FEW_SHOT_K=many\n", "FEW_SHOT_K: Input should be a valid integer"),
    ],
)
def test_a_bad_configuration_file_is_refused_naming_the_line(tmp_path, monkeypatch, text, message):
    monkeypatch.setenv("OPENAI_API_KEY", TEST_API_KEY)
    with pytest.raises(ConfigError) as caught:
        load_configuration(write_config(tmp_path, "bad", text))
    assert message in str(caught.value)


def test_compare_stops_before_any_llm_call_on_an_unknown_setting(tmp_path, llm):
    source = wikigold_slice(tmp_path, 1)
    good = write_config(tmp_path, "good", "LLM_MODEL=fake-good\n")
    typo = write_config(tmp_path, "typo", "LLM_MODEL=fake-good\nPACKSIZE=4\n")
    done = cli_on_fake(llm, tmp_path, "compare", str(source), "--config", str(good), "--config", str(typo), "--quiet")
    assert done.returncode == 2
    assert done.stderr.strip() == f"llm-ner: {typo}:2: unknown setting PACKSIZE (did you mean PACK_SIZE?)"
    assert llm.requests == []


def test_compare_names_an_unreachable_endpoint_and_stops_at_the_first_task(tmp_path, llm):
    source = wikigold_slice(tmp_path, 2)
    closed = f"http://127.0.0.1:{free_port()}/v1"
    down = write_config(tmp_path, "down", f"OPENAI_BASE_URL={closed}\nLLM_MAX_RETRIES=1\n")
    done = cli_on_fake(llm, tmp_path, "compare", str(source), "--config", str(down), "--quiet")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"llm-ner: configuration down: the LLM endpoint ({closed}, model fake-model) failed on the first task")
    assert "could not connect to the LLM endpoint (check OPENAI_BASE_URL)" in done.stderr
    assert "Traceback" not in done.stderr and TEST_API_KEY not in done.stderr


def test_compare_needs_ground_truth_and_something_to_compare(tmp_path, llm):
    raw = tmp_path / "raw.conll"
    raw.write_text("Ada O\nsmiled O\n", encoding="utf-8")
    config = write_config(tmp_path, "a", "LLM_MODEL=fake-model\n")
    untagged = cli_on_fake(llm, tmp_path, "compare", str(raw), "--config", str(config), "--quiet")
    assert untagged.returncode == 1 and "raw.conll: no entity tags, so no ground truth" in untagged.stderr
    nothing = cli_on_fake(llm, tmp_path, "compare", str(wikigold_slice(tmp_path, 1)), "--quiet")
    assert nothing.returncode == 1 and "give --config FILE and/or --model-version V" in nothing.stderr
    versions = cli_on_fake(llm, tmp_path, "compare", str(raw), "--model-version", "v1", "--quiet")
    assert versions.returncode == 2 and "--model-version needs --project" in versions.stderr
    for done in (untagged, nothing, versions):
        assert "Traceback" not in done.stderr
    assert llm.requests == []


# ---- the bootstrap ----
def counts(rows) -> np.ndarray:
    """Per-task (strict correct, partial correct, partial overlaps, gold, predicted)."""
    return np.array(rows, dtype=np.int64)


def test_paired_bootstrap_of_identical_systems_is_exactly_zero():
    a = counts([(3, 3, 0, 4, 4), (1, 1, 1, 3, 2), (0, 0, 0, 2, 1)])
    assert paired_bootstrap(a, a.copy(), resamples=300) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_excludes_zero_only_when_one_system_is_better_across_tasks():
    rng = np.random.default_rng(1)
    gold = rng.integers(2, 8, size=60)
    better = counts([(g, g, 0, g, g) for g in gold])  # every entity right
    worse = counts([(g - 1, g - 1, 0, g, g) for g in gold])  # one wrong in every task
    observed, low, high, share = paired_bootstrap(better, worse, resamples=500, seed=4)
    assert 0 < low <= observed <= high and share == 0.0
    # each system right on half the tasks and wrong on the other half: a coin toss
    half_a = counts([(g, g, 0, g, g) if i % 2 else (0, 0, 0, g, g) for i, g in enumerate(gold)])
    half_b = counts([(0, 0, 0, g, g) if i % 2 else (g, g, 0, g, g) for i, g in enumerate(gold)])
    observed, low, high, share = paired_bootstrap(half_a, half_b, resamples=500, seed=4)
    assert low < 0 < high and 0.1 < share < 0.9
    assert paired_bootstrap(half_a, half_b, resamples=500, seed=4) == (observed, low, high, share)  # the seed repeats it


def test_per_task_counts_sum_to_the_scorers_micro_figures(tmp_path):
    units = build_units(read_conll(wikigold_slice(tmp_path, 6)), per="sentence")
    gazetteer = gazetteer_for(units, drop_label="MISC")
    gold = [[(e.start, e.end, e.label) for e in u.entities] for u in units]
    # boundaries cut short on some spans, so partial matches exist too
    predicted = [sorted((s, e - 1 if (s + e) % 3 == 0 else e, l) for s, e, l in gazetteer_spans(u.text, gazetteer)) for u in units]
    labels = ["LOC", "MISC", "ORG", "PER"]
    report = score(gold, predicted, labels=labels)
    totals = task_counts(gold, predicted, labels).sum(axis=0)
    assert report.micro["partial"].partial > 0
    assert micro_f1(totals, "strict") == pytest.approx(report.micro["strict"].f1)
    assert micro_f1(totals, "partial") == pytest.approx(report.micro["partial"].f1)


def test_a_packed_configuration_scores_the_same_from_fewer_requests_and_reports_every_answers_wait(tmp_path, llm):
    source = wikigold_slice(tmp_path, 2)
    units = build_units(read_conll(source), per="sentence")
    gazetteer = gazetteer_for(units, drop_label="MISC")
    llm.model_gazetteers = {"fake-alone": gazetteer, "fake-packed": gazetteer}
    alone = write_config(tmp_path, "alone", "LLM_MODEL=fake-alone\n")
    packed = write_config(tmp_path, "packed", "LLM_MODEL=fake-packed\nPACK_SIZE=8\n")
    figures = tmp_path / "packing.json"
    done = cli_on_fake(llm, tmp_path, "compare", str(source), "--per", "sentence", "--examples", "none", "--config", str(alone),
                   "--config", str(packed), "--json", str(figures), "--quiet")
    assert done.returncode == 0, done.stderr
    systems = {s["name"]: s for s in json.loads(figures.read_text())["systems"]}
    requests = {model: [r for r in llm.requests if r["model"] == model] for model in ("fake-alone", "fake-packed")}
    assert len(requests["fake-alone"]) == len(units)
    # the first task is asked alone (it probes the endpoint), the others 8 to a request
    assert len(requests["fake-packed"]) == 1 + -(-(len(units) - 1) // 8)
    assert systems["packed"]["micro"] == systems["alone"]["micro"]
    assert systems["packed"]["micro"]["strict"]["f1"] == pytest.approx(gazetteer_figures(units, gazetteer)[2])
    assert systems["packed"]["usage"]["prompt_tokens"] < systems["alone"]["usage"]["prompt_tokens"] / 2
    assert systems["packed"]["latency"]["answers"] == systems["alone"]["latency"]["answers"] == len(units)


def test_a_configuration_asks_the_llm_what_the_backend_asks_occurrence_hints_included(tmp_path, llm):
    # OCCURRENCE_HINTS (on by default with PROMPT_LANGUAGE=zh) changes the prompt and the answer's schema:
    # a configuration that set it must be compared as the backend would run it, not without the hints
    source = wikigold_slice(tmp_path, 2)
    hints = write_config(tmp_path, "hints", "OCCURRENCE_HINTS=true\n")
    done = cli_on_fake(llm, tmp_path, "compare", str(source), "--config", str(hints), "--examples", "none", "--quiet")
    assert done.returncode == 0, done.stderr
    compared = sorted(llm.requests, key=lambda r: r["messages"][-1]["content"])
    llm.requests.clear()

    done = cli_on_fake(llm, tmp_path, "predict-conll", str(source), "--out", str(tmp_path / "out.conll"), "--quiet",
                       OCCURRENCE_HINTS="true")
    assert done.returncode == 0, done.stderr
    served = sorted(llm.requests, key=lambda r: r["messages"][-1]["content"])

    assert len(compared) == len(served) == 2
    assert "context" in json.dumps(served[0]["response_format"])  # the hints are in what the backend asks
    for ours, theirs in zip(compared, served):
        assert ours["messages"] == theirs["messages"]
        assert ours["response_format"] == theirs["response_format"]
