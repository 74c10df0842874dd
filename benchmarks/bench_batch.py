"""Batch API mode against the synchronous mode for the same tasks: `llm-ner prelabel --batch-api` and
`llm-ner prelabel` on two identical projects of wikigold sentences, in a real Label Studio 1.23.2, the
provider being the fake OpenAI server (tests/fake_llm.py: its chat endpoint, and /v1/files and
/v1/batches answered by the same logic). Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_batch.py                 # 500 sentences, gpt-4o-mini's price
    .venv/bin/python benchmarks/bench_batch.py --sentences 2000 --price 2.5 10

Tokens are the fake's counts (a token per 4 characters of the prompt and of the answer), the same in
both modes for the same request; cost is LLM_PRICES's price for the model, halved for batch lines.
Each mode has its own MODEL_DIR (its own response cache), so neither answers the other's tasks.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backend.infra.storage import DB_NAME  # noqa: E402
from backend.tools.conll import build_units, read_files  # noqa: E402
from tests.conftest import NER_CONFIG, WIKIGOLD, gazetteer_for  # noqa: E402
from tests.fake_llm import FakeLLM  # noqa: E402
from tests.processes import backend_env, run_label_studio  # noqa: E402

MODEL = "gpt-4o-mini"


def make_project(ls, title: str, texts: list[str]) -> int:
    client = ls.client()
    project = client.projects.create(title=title, label_config=NER_CONFIG)
    client.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts])
    return project.id


def run(ls, fake: FakeLLM, project_id: int, model_dir: Path, price: tuple[float, float], *flags: str) -> tuple[float, str]:
    env = backend_env(fake.base_url, model_dir, LOG_LEVEL="WARNING", LLM_MODEL=MODEL, BATCH_POLL_SECONDS="0.2",
                      LLM_PRICES=json.dumps({MODEL: list(price)}))
    command = [sys.executable, "-m", "backend", "prelabel", "--project", str(project_id), "--yes", "--quiet",
               "--label-studio-url", ls.url, "--api-key", ls.token, *flags]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:])
    return time.monotonic() - started, done.stdout


def ledger(model_dir: Path) -> dict:
    with sqlite3.connect(model_dir / DB_NAME) as conn:
        conn.row_factory = sqlite3.Row
        (row,) = conn.execute("SELECT * FROM llm_usage").fetchall()
        return dict(row)


def predictions(ls, project_id: int) -> dict[str, list]:
    client = ls.client()
    out = {}
    for task in client.tasks.list(project=project_id, fields="all"):
        (prediction,) = task.predictions
        result = prediction["result"] if isinstance(prediction, dict) else prediction.result
        out[task.data["text"]] = sorted((r["value"]["start"], r["value"]["end"], r["value"]["labels"][0]) for r in result)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--price", type=float, nargs=2, default=(0.15, 0.6), metavar=("PROMPT", "COMPLETION"),
                        help="USD per 1M tokens (default gpt-4o-mini's)")
    args = parser.parse_args()
    units = build_units(read_files([WIKIGOLD]), per="sentence")[: args.sentences]
    texts = [u.text for u in units]
    fake = FakeLLM()
    fake.gazetteer = gazetteer_for(units, drop_label="MISC")
    price = tuple(args.price)
    with run_label_studio() as ls, tempfile.TemporaryDirectory() as tmp:
        figures = {}
        for mode, flags in (("batch", ("--batch-api",)), ("sync", ())):
            project_id = make_project(ls, f"bench {mode}", texts)
            model_dir = Path(tmp) / mode
            calls_before, batch_lines_before = len(fake.requests), len(fake.batch_requests)
            wall, out = run(ls, fake, project_id, model_dir, price, *flags)
            figures[mode] = dict(ledger(model_dir), wall=wall, sync_calls=len(fake.requests) - calls_before,
                                 batch_lines=len(fake.batch_requests) - batch_lines_before, out=out,
                                 predictions=predictions(ls, project_id))
    fake.close()
    print(f"{len(texts)} wikigold sentences, {MODEL} at ${price[0]:g} / ${price[1]:g} per 1M prompt / completion tokens")
    print(f"{'mode':<8}{'batch lines':>12}{'sync calls':>12}{'prompt tok':>12}{'answer tok':>12}{'cost USD':>12}{'wall s':>9}")
    for mode in ("batch", "sync"):
        f = figures[mode]
        print(f"{mode:<8}{f['batch_lines']:>12}{f['sync_calls']:>12}{f['prompt_tokens']:>12}{f['completion_tokens']:>12}"
              f"{f['cost_usd']:>12.5f}{f['wall']:>9.1f}")
    batch, sync = figures["batch"], figures["sync"]
    same = batch["predictions"] == sync["predictions"]
    print(f"batch cost / sync cost: {batch['cost_usd'] / sync['cost_usd']:.3f}; identical predictions in both projects: {same}")
    summary = [line for line in batch["out"].splitlines() if line.startswith("Batch API:")]
    print(summary[0] if summary else batch["out"][-500:])


if __name__ == "__main__":
    main()
