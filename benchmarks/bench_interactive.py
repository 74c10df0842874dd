"""Interactive latency: how long an annotator waits after drawing a region.

    .venv/bin/python benchmarks/bench_interactive.py [--rounds N]

Runs the real backend (`llm-ner serve`, gunicorn) against the fake LLM (tests/fake_llm.py) and times
interactive /predict calls (one task, one drawn region) over HTTP: the fast path alone
(INTERACTIVE_LLM=false), and with the LLM completion at 0 ms and 500 ms of LLM latency.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import NER_CONFIG  # noqa: E402
from tests.fake_llm import FakeLLM  # noqa: E402
from tests.processes import backend_env, run_backend  # noqa: E402

TEXT = " ".join(["Ada met Babbage in London; later Ada wrote notes that Babbage read in London."] * 20)
DRAWN = {"from_name": "label", "to_name": "text", "type": "labels", "value": {"start": 0, "end": 3, "text": "Ada", "labels": ["PER"]}}


def time_rounds(url: str, rounds: int) -> list[float]:
    body = {"tasks": [{"id": 1, "data": {"text": TEXT}}], "project": "1.1", "label_config": NER_CONFIG,
            "params": {"context": {"result": [DRAWN]}}}
    timings = []
    with httpx.Client(timeout=60) as client:
        client.post(url + "/predict", json=body)  # warm-up: model object, label config parse
        for i in range(rounds):
            body["tasks"][0]["data"]["text"] = TEXT + f" Round {i}."  # no response-cache hit
            started = time.perf_counter()
            response = client.post(url + "/predict", json=body)
            timings.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200 and response.json()["results"][0]["result"], response.text
    return timings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    llm = FakeLLM()
    llm.gazetteer = {"Ada": "PER", "Babbage": "PER", "London": "LOC"}
    print(f"text: {len(TEXT)} chars, 1 drawn region; {args.rounds} rounds each; median / p95 in ms")
    for label, env, latency in [
        ("fast path only (INTERACTIVE_LLM=false)", {"INTERACTIVE_LLM": "false"}, 0.0),
        ("fast path + LLM, LLM latency 0 ms", {}, 0.0),
        ("fast path + LLM, LLM latency 500 ms", {}, 0.5),
    ]:
        llm.latency = latency
        with tempfile.TemporaryDirectory() as model_dir:
            with run_backend(backend_env(llm.base_url, Path(model_dir), LOG_LEVEL="WARNING", **env), workers=1) as backend:
                timings = sorted(time_rounds(backend.url, args.rounds))
        p95 = timings[min(len(timings) - 1, int(0.95 * len(timings)))]
        print(f"{label:<42} {statistics.median(timings):8.1f} {p95:8.1f}")
    llm.close()


if __name__ == "__main__":
    main()
