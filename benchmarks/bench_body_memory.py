"""Peak memory of one backend worker under concurrent large request bodies (REQUEST_BODY_BUDGET).

Starts `llm-ner serve` with one worker (open mode, the fake OpenAI-compatible server, SQLite), makes
project 1 known, then sends N concurrent webhooks of B MB each (default 8 of 47.6 MB: what the probe
of issue 26 sent), each a JSON object with a known project and a list of short strings, the form
that parsing turns into the most Python objects per byte. Prints the worker's peak resident memory
(VmHWM of /proc/<pid>/status) and how the requests were answered. Asserts nothing.

    .venv/bin/python benchmarks/bench_body_memory.py                      # today's defaults
    .venv/bin/python benchmarks/bench_body_memory.py --budget 1000000000  # no budget to speak of
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import NER_CONFIG  # noqa: E402
from tests.fake_llm import FakeLLM  # noqa: E402
from tests.processes import backend_env, run_backend  # noqa: E402


def body(megabytes: float) -> bytes:
    count = int(megabytes * 1_000_000 / len('"abcdefghij",'))
    padding = b"[" + b'"abcdefghij",' * (count - 1) + b'"abcdefghij"]'
    return b'{"action": "ANNOTATION_CREATED", "project": {"id": 1}, "padding": ' + padding + b"}"


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bodies", type=int, default=8)
    parser.add_argument("--megabytes", type=float, default=47.6)
    parser.add_argument("--budget", type=int, default=None, help="REQUEST_BODY_BUDGET (unset: the default)")
    parser.add_argument("--wait", type=float, default=None, help="REQUEST_BODY_WAIT (unset: the default)")
    args = parser.parse_args()

    payload = body(args.megabytes)
    extra = {"REQUEST_BODY_BUDGET": str(args.budget)} if args.budget else {}
    if args.wait is not None:
        extra["REQUEST_BODY_WAIT"] = str(args.wait)
    llm = FakeLLM()
    with tempfile.TemporaryDirectory() as model_dir, run_backend(backend_env(llm.base_url, Path(model_dir), **extra), workers=1) as backend:
        setup = httpx.post(backend.url + "/setup", json={"project": "1", "schema": NER_CONFIG}, timeout=60)
        pid = int(setup.headers["X-Backend-Worker"])
        before = peak_rss_mb(pid)

        def send(_: int) -> tuple[int, float]:
            started = time.perf_counter()
            response = httpx.post(backend.url + "/webhook", content=payload, headers={"Content-Type": "application/json"},
                                  timeout=300)
            return response.status_code, time.perf_counter() - started

        started = time.perf_counter()
        with ThreadPoolExecutor(args.bodies) as pool:
            answers = list(pool.map(send, range(args.bodies)))
        elapsed = time.perf_counter() - started
        print(f"{args.bodies} concurrent bodies of {len(payload) / 1e6:.1f} MB, REQUEST_BODY_BUDGET="
              f"{args.budget or 'default'}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"worker peak RSS: {before:.0f} MB after /setup, {peak_rss_mb(pid):.0f} MB after the bodies")
        print(f"answers: {dict(Counter(status for status, _ in answers))}; slowest {max(t for _, t in answers):.1f} s, "
              f"all in {elapsed:.1f} s")
    llm.close()


if __name__ == "__main__":
    main()
