"""Usage and cost: per-project totals from the API's usage, prices, and the `llm-ner estimate` dry run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from backend.infra.usage import UsageLedger, price_of
from tests.conftest import WIKIGOLD, figures, metric, predict
from tests.processes import REPO


def test_usage_and_cost_are_totalled_per_project_from_the_apis_usage(make_client, llm, tmp_path):
    llm.gazetteer = {"Oslo": "LOC"}
    client = make_client(llm_prices={"fake-model": (2.0, 8.0)})
    tokens_before = metric("llm_ner_project_tokens_total", project="12", kind="prompt")
    cost_before = metric("llm_ner_project_cost_usd_total", project="12")
    predict(client, ["Oslo one.", "Oslo two.", "Three."], project="12.1")
    # what the fake reported, call by call (prompt: characters / 4; completion: answer characters / 4)
    prompt = sum(max(1, sum(len(m["content"]) for m in r["messages"]) // 4) for r in llm.requests)
    totals = UsageLedger.in_dir(tmp_path / "model").totals("12")
    assert (totals["tasks"], totals["calls"], totals["prompt_tokens"]) == (3, 3, prompt)
    assert totals["cost_usd"] == pytest.approx((prompt * 2.0 + totals["completion_tokens"] * 8.0) / 1e6)
    assert metric("llm_ner_project_tokens_total", project="12", kind="prompt") - tokens_before == prompt
    assert metric("llm_ner_project_cost_usd_total", project="12") - cost_before == pytest.approx(totals["cost_usd"])


def test_prices_match_a_dated_model_name_by_its_longest_prefix():
    prices = {"gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6)}
    assert price_of(prices, "gpt-4o-mini-2024-07-18") == (0.15, 0.6)
    assert price_of(prices, "gpt-4o-2024-08-06") == (2.5, 10.0)
    assert price_of(prices, "llama3.1") is None and price_of(None, "gpt-4o") is None


def test_llm_prices_setting_is_json_and_bad_values_name_the_setting(monkeypatch):
    from backend.infra.errors import ConfigError
    from backend.infra.settings import load_settings

    monkeypatch.setenv("LLM_PRICES", '{"gpt-4o-mini": [0.15, 0.6]}')
    assert load_settings(openai_api_key="k", _env_file=None).llm_prices == {"gpt-4o-mini": (0.15, 0.6)}
    monkeypatch.setenv("LLM_PRICES", '{"gpt-4o-mini": "cheap"}')
    with pytest.raises(ConfigError, match="LLM_PRICES"):
        load_settings(openai_api_key="k", _env_file=None)


def run_cli(*args, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_", "PACK_"))}
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)


@pytest.fixture
def small_conll(tmp_path):
    lines = WIKIGOLD.read_text(encoding="utf-8").splitlines()[:400]
    path = tmp_path / "small.conll"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_estimate_is_a_dry_run_with_tokens_calls_and_cost(small_conll, llm):
    done = run_cli("estimate", str(small_conll), "--examples", "3", LLM_PRICES='{"gpt-4o-mini": [0.15, 0.6]}')
    assert done.returncode == 0, done.stderr
    out = figures(done.stdout)
    texts, calls = int(out["texts"]), int(out["LLM calls"])
    assert texts > 10 and calls == texts
    prompt_per_text = float(out["prompt tokens"].split("(")[1].split()[0])
    assert 200 < prompt_per_text < 2000
    assert out["cost"].startswith("$")
    assert llm.requests == []  # nothing was sent (and no OPENAI_API_KEY was needed)

    packed = figures(run_cli("estimate", str(small_conll), "--examples", "3", "--pack", "8").stdout)
    assert int(packed["LLM calls"]) == -(-texts // 8)
    assert float(packed["prompt tokens"].split("(")[1].split()[0]) * 3 <= prompt_per_text
    assert packed["cost"].startswith("unknown")


def test_estimate_without_input_or_with_a_missing_file_fails_with_a_message(tmp_path):
    nothing = run_cli("estimate")
    assert nothing.returncode != 0 and "CoNLL files or --project" in nothing.stderr and "Traceback" not in nothing.stderr
    missing = run_cli("estimate", str(tmp_path / "nope.conll"))
    assert missing.returncode != 0 and "nope.conll" in missing.stderr and "Traceback" not in missing.stderr
    no_ls = run_cli("estimate", "--project", "3", LABEL_STUDIO_URL="", LABEL_STUDIO_API_KEY="")
    assert no_ls.returncode != 0 and "--label-studio-url" in no_ls.stderr


def test_a_sampled_estimate_never_reads_a_task_beyond_its_sample():
    from backend.infra.settings import load_settings
    from backend.ner.labelconfig import parse_label_config
    from backend.ner.task import NerTask
    from backend.ner.templates import load_templates
    from backend.tools.estimate import estimate_sampled
    from tests.conftest import NER_CONFIG

    settings = load_settings(openai_api_key="x", estimate_sample=50)
    target = parse_label_config(NER_CONFIG).targets[0]
    task = NerTask(target, load_templates(settings.prompts_dir, True))

    def project(size: int):
        for i in range(size):
            if i >= settings.estimate_sample:
                raise AssertionError(f"task {i} read: the sample is {settings.estimate_sample}")
            yield None if i % 5 == 0 else {target.key: f"Text {i} about Ada Lovelace in Oslo."}

    estimated = estimate_sampled({target.key: task}, project(10_000_000), 10_000_000, lambda key, sample: [], settings)
    assert (estimated.read, estimated.of, estimated.texts) == (50, 10_000_000, 8_000_000)
    assert estimated.error is not None and 0 < estimated.error < 1
    assert "the first 50 of 10000000 tasks, extrapolated: ±" in estimated.describe()
