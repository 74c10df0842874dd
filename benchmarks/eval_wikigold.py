"""The README's worked examples of `compare` and `simulate`: Wikigold with the fake LLM (tests/fake_llm.py).

    .venv/bin/python benchmarks/eval_wikigold.py [--screenshots docs/]

The fake answers from a gazetteer of Wikigold's own names (MISC left out; one LOC name given as ORG),
so the figures show the mechanics, not a model's quality:
- compare: `full` (the gazetteer), `no-people` (PER left out too: worse by construction) and `full-k0`
  (the gazetteer, no few-shot examples: the same answers from fewer tokens), on the 145 documents;
- simulate: a fake that knows 35% of the names by itself and picks up every name labelled in the
  few-shot examples of its prompt, on Wikigold's sentences.
Reports and JSON go to benchmarks/out/; with --screenshots, the top of each report is captured there.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.tools.cli import main as llm_ner
from backend.tools.conll import build_units, read_conll
from tests.conftest import gazetteer_for
from tests.fake_llm import FakeLLM

REPO = Path(__file__).resolve().parent.parent
WIKIGOLD = REPO / "tests" / "data" / "wikigold" / "wikigold.conll.txt"
OUT = REPO / "benchmarks" / "out"
PRICES = '{"fake": [0.15, 0.6]}'  # USD per 1M prompt / completion tokens (gpt-4o-mini's list price), for every fake-* model


def run(*args: str) -> None:
    print(f"$ llm-ner {' '.join(args)}", flush=True)
    started = time.perf_counter()
    code = llm_ner(list(args))
    print(f"(exit {code}, {time.perf_counter() - started:.1f} s)\n", flush=True)


def screenshot(html: Path, png: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.goto(html.as_uri())
        page.screenshot(path=str(png))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshots", type=Path, help="write report screenshots into this directory")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    fake = FakeLLM()
    units = build_units(read_conll(WIKIGOLD))
    full = gazetteer_for(units, drop_label="MISC")
    fake.model_gazetteers = {
        "fake-full": full,
        "fake-no-people": {s: l for s, l in full.items() if l != "PER"},
    }
    configs = Path(tempfile.mkdtemp(prefix="eval-configs-"))
    (configs / "full.env").write_text("LLM_MODEL=fake-full\n")
    (configs / "no-people.env").write_text("LLM_MODEL=fake-no-people\n")
    (configs / "full-k0.env").write_text("LLM_MODEL=fake-full\nFEW_SHOT_K=0\n")
    for key in [k for k in os.environ if k.startswith(("OPENAI_", "LLM_", "FEW_SHOT", "PACK_"))]:
        del os.environ[key]
    os.environ.update(OPENAI_API_KEY="fake", OPENAI_BASE_URL=fake.base_url, LLM_PRICES=PRICES, MODEL_DIR=str(configs / "model"))

    run("compare", str(WIKIGOLD), "--config", str(configs / "full.env"), "--config", str(configs / "no-people.env"),
        "--config", str(configs / "full-k0.env"), "--json", str(OUT / "compare.json"), "--html", str(OUT / "compare.html"))
    print(f"LLM requests: {len(fake.requests)}\n")

    fake.reset()
    fake.gazetteer = full
    fake.skill = lambda examples: 0.35
    fake.recall_examples = True
    os.environ["LLM_MODEL"] = "fake-learner"
    run("simulate", str(WIKIGOLD), "--per", "sentence", "--holdout", "200", "--target", "0.5",
        "--schedule", "0,5,10,20,50,100,200,500,1000,1496",
        "--json", str(OUT / "simulate.json"), "--html", str(OUT / "simulate.html"))
    print(f"LLM requests: {len(fake.requests)}")
    fake.close()
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
        screenshot(OUT / "compare.html", args.screenshots / "report-compare.png")
        screenshot(OUT / "simulate.html", args.screenshots / "report-simulate.png")


if __name__ == "__main__":
    main()
