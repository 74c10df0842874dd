"""The LLM engine's figures, measured through the real backend (`llm-ner serve`, gunicorn) over HTTP
against the fake OpenAI-compatible server (tests/fake_llm.py). Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_predict.py            # everything
    .venv/bin/python benchmarks/bench_predict.py throughput # one part: throughput, overhead, tokens

throughput  200 tasks in one /predict, fake latency 300 ms, at most 16 requests served at once by the
            fake: wall time against the ideal ceil(200/16) x 0.3 s; the same with PREDICT_CONCURRENCY=1;
            peak RSS (VmHWM) of each gunicorn worker during the run
overhead    the backend's own time per task, fake latency 0, 2 KB texts, 5 few-shot examples: the gap
            between the fake sending one answer and the next request arriving (one call in flight),
            in 5 rounds of 200 new tasks, with the worker's CPU time per task
tokens      prompt tokens per CoNLL sentence (wikigold) with 3 examples, PACK_SIZE 1 and 8, counted
            with the o200k tokenizer on the messages the fake received
"""

from __future__ import annotations

import math
import os
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import NER_CONFIG, WIKIGOLD  # noqa: E402
from tests.fake_llm import FakeLLM  # noqa: E402
from tests.processes import backend_env, run_backend  # noqa: E402


def worker_pids(master: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                pids.append(int(entry.name))
    return pids


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process: its own CPU work, whatever else the machine is doing."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve(fake: FakeLLM, workers: int = 1, **env: str):
    model_dir = Path(tempfile.mkdtemp(prefix="bench-model-"))
    log = Path(tempfile.mkstemp(prefix="bench-backend-", suffix=".log")[1])
    environment = backend_env(fake.base_url, model_dir, LOG_LEVEL="WARNING", **env)
    return run_backend(environment, workers=workers, log_path=log)


def predict(url: str, texts: list[str], project: str = "1") -> tuple[float, dict]:
    tasks = [{"id": i + 1, "data": {"text": t}} for i, t in enumerate(texts)]
    started = time.perf_counter()
    response = httpx.post(url + "/predict", json={"tasks": tasks, "project": f"{project}.1", "label_config": NER_CONFIG}, timeout=300)
    wall = time.perf_counter() - started
    response.raise_for_status()
    body = response.json()
    assert len(body["results"]) == len(texts)
    return wall, body


def sentence(rng: random.Random, i: int) -> str:
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(12)]
    return f"Task {i}: Ada Lovelace met Charles Babbage in London; " + " ".join(words) + "."


def throughput() -> None:
    fake = FakeLLM()
    fake.gazetteer = {"Ada Lovelace": "PER", "Charles Babbage": "PER", "London": "LOC"}
    rng = random.Random(1)
    texts = [sentence(rng, i) for i in range(200)]
    ideal = math.ceil(200 / 16) * 0.3
    print("== throughput: 200 tasks in one /predict; fake LLM 300 ms latency, 16 requests at once ==")
    for concurrency in (16, 1):
        fake.reset()
        fake.gazetteer = {"Ada Lovelace": "PER", "Charles Babbage": "PER", "London": "LOC"}
        fake.latency, fake.max_concurrency = 0.3, 16
        with serve(fake, workers=2, PREDICT_CONCURRENCY=str(concurrency), PREDICT_DEADLINE="95") as backend:
            predict(backend.url, ["warm-up"])  # the worker's first request loads the model object
            fake.requests.clear()
            wall, body = predict(backend.url, texts, project="2")
            labeled = sum(1 for r in body["results"] if r["result"])
            rss = {pid: peak_rss_mb(pid) for pid in worker_pids(backend.proc.pid)}
        this_ideal = ideal if concurrency == 16 else 200 * 0.3
        print(
            f"PREDICT_CONCURRENCY={concurrency:<3} wall {wall:6.2f} s   ideal {this_ideal:6.2f} s   ratio {wall / this_ideal:.3f}   "
            f"labeled {labeled}/200   LLM requests {len(fake.requests)}   peak in flight at the fake {fake.peak_in_flight}"
        )
        print("    peak RSS per worker (VmHWM): " + ", ".join(f"{mb:.0f} MB" for mb in sorted(rss.values())))
        if concurrency == 16:
            print(f"    vs ideal ceil(200/16) x 0.3 s = {ideal:.2f} s: ratio {wall / ideal:.3f} (target <= 1.15)")
    fake.close()


def overhead(n: int = 200, rounds: int = 5) -> None:
    print("== overhead: the backend's own time per task (fake latency 0, 2 KB texts, 5 examples) ==")
    rng = random.Random(2)
    fake = FakeLLM()
    gazetteer = {"Ada Lovelace": "PER", "Charles Babbage": "PER", "London": "LOC"}
    fake.gazetteer = gazetteer

    def two_kb(i: int) -> str:
        text = sentence(rng, i)
        while len(text) < 2048:
            text += " " + sentence(rng, i)
        return text[:2048]

    all_gaps: list[float] = []
    round_medians: list[float] = []
    with serve(fake, workers=1, PREDICT_CONCURRENCY="1", FEW_SHOT_K="5", FEW_SHOT_TOKEN_BUDGET="100000") as backend:
        httpx.post(backend.url + "/setup", json={"project": "3", "schema": NER_CONFIG}, timeout=30).raise_for_status()
        for i in range(5):
            text = two_kb(1000 + i)
            start = text.index("Ada Lovelace")
            event = {
                "action": "ANNOTATION_CREATED",
                "annotation": {"id": i + 1, "task": 1000 + i, "was_cancelled": False, "ground_truth": False,
                               "updated_at": "2025-01-01T00:00:00Z",
                               "result": [{"from_name": "label", "to_name": "text", "type": "labels",
                                           "value": {"start": start, "end": start + 12, "text": "Ada Lovelace", "labels": ["PER"]}}]},
                "task": {"id": 1000 + i, "data": {"text": text}},
                "project": {"id": 3, "label_config": NER_CONFIG},
            }
            httpx.post(backend.url + "/webhook", json=event, timeout=30).raise_for_status()
        predict(backend.url, [two_kb(-1)], project="3")  # warm-up
        (worker,) = worker_pids(backend.proc.pid)
        print(f"{rounds} rounds of one /predict with {n} new tasks each (one LLM call in flight at a time)")
        for r in range(rounds):
            fake.reset()
            fake.gazetteer = gazetteer
            texts = [two_kb(10_000 * (r + 1) + i) for i in range(n)]  # new texts: every task misses the cache
            cpu_before = cpu_seconds(worker)
            wall, _ = predict(backend.url, texts, project="3")
            cpu = cpu_seconds(worker) - cpu_before
            gaps = sorted((fake.request_times[i + 1] - fake.reply_times[i]) * 1000 for i in range(len(fake.reply_times) - 1))
            served = statistics.median(fake.reply_times[i] - fake.request_times[i] for i in range(len(fake.reply_times))) * 1000
            all_gaps.extend(gaps)
            round_medians.append(statistics.median(gaps))
            print(f"  round {r + 1}: between LLM calls median {statistics.median(gaps):.2f} ms, p90 {gaps[int(0.9 * len(gaps))]:.2f} ms; "
                  f"worker CPU {cpu * 1000 / n:.2f} ms a task; whole /predict {wall * 1000 / n:.2f} ms a task; "
                  f"the fake's own time {served:.2f} ms a call")
        examples_shown = (len(fake.requests[0]["messages"]) - 2) // 2
        prompt_chars = sum(len(m["content"]) for m in fake.requests[0]["messages"])
    fake.close()
    all_gaps.sort()
    print(f"{examples_shown} examples per prompt, prompt ~{prompt_chars} chars")
    print(f"backend time between LLM calls over all {len(all_gaps)} gaps: median {statistics.median(all_gaps):.2f} ms, "
          f"p90 {all_gaps[int(0.9 * len(all_gaps))]:.2f} ms; round medians {min(round_medians):.2f}-{max(round_medians):.2f} ms "
          "(target median <= 2 ms)")
    print("(the fake's own time per call shows how fast the machine was: the same work, a different speed)")
    print(f"machine load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def tokens(limit: int = 200) -> None:
    from backend.infra.usage import count_message_tokens
    from backend.tools.conll import build_units, read_conll

    print("== prompt tokens per CoNLL sentence (wikigold), 3 few-shot examples ==")
    units = [u for u in build_units(read_conll(WIKIGOLD), per="sentence") if u.text.strip()]
    shots, targets = units[:3], units[3 : 3 + limit]
    fake = FakeLLM()
    fake.gazetteer = {e.text: e.label for u in units[: 3 + limit] for e in u.entities}
    figures = {}
    for pack in (1, 8, 16):
        fake.reset()
        fake.gazetteer = {e.text: e.label for u in units[: 3 + limit] for e in u.entities}
        with serve(fake, workers=1, PACK_SIZE=str(pack), FEW_SHOT_K="3", FEW_SHOT_TOKEN_BUDGET="100000") as backend:
            httpx.post(backend.url + "/setup", json={"project": "4", "schema": NER_CONFIG}, timeout=30).raise_for_status()
            for i, unit in enumerate(shots):
                result = [{"from_name": "label", "to_name": "text", "type": "labels",
                           "value": {"start": e.start, "end": e.end, "text": e.text, "labels": [e.label]}} for e in unit.entities]
                event = {"action": "ANNOTATION_CREATED",
                         "annotation": {"id": i + 1, "task": 5000 + i, "was_cancelled": False, "ground_truth": False,
                                        "updated_at": "2025-01-01T00:00:00Z", "result": result},
                         "task": {"id": 5000 + i, "data": {"text": unit.text}}, "project": {"id": 4, "label_config": NER_CONFIG}}
                httpx.post(backend.url + "/webhook", json=event, timeout=30).raise_for_status()
            fake.requests.clear()
            predict(backend.url, [u.text for u in targets], project="4")
        sent = sum(count_message_tokens(r["messages"], "gpt-4o-mini") for r in fake.requests)
        figures[pack] = sent / len(targets)
        print(f"PACK_SIZE={pack:<3} {len(fake.requests):4d} LLM calls for {len(targets)} sentences   "
              f"{figures[pack]:7.1f} prompt tokens per sentence   ({figures[1] / figures[pack]:.2f}x fewer than unpacked)")
    fake.close()


PARTS = {"throughput": throughput, "overhead": overhead, "tokens": tokens}

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(PARTS)
    for name in chosen:
        PARTS[name]()
        print()
