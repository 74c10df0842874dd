"""A whole project pre-labeled by a job (`llm-ner prelabel`), against a real Label Studio 1.23.2 and
the fake OpenAI-compatible server (tests/fake_llm.py). Prints figures, each with the machine's load
average (1 min) when it was taken; asserts nothing.

    .venv/bin/python benchmarks/bench_project_job.py                        # 10,000 tasks, 300 ms, cap 16
    .venv/bin/python benchmarks/bench_project_job.py --runs 2               # the run twice (a new project each)
    .venv/bin/python benchmarks/bench_project_job.py --tasks 100000 --latency 0.05 --skip-kill

run     the job on N tasks, fake latency L, the fake serving at most 16 requests at once and the job
        16 calls in flight: wall time against the ideal ceil(N/16) x L; when the first LLM request
        arrived (start-up) and how long after the last answer the job ended (the last write); calls
        in flight on average; tasks/s written into Label Studio; the job's peak RSS (VmHWM) and its
        RSS at each quarter of the tasks written (flat or not); LLM calls (should be exactly N)
kill    a second project of N tasks: the job is killed (SIGKILL) at half way and run again; LLM calls
        over both runs against 1.01 N + the calls in flight at the kill (answers not yet in the cache)

--ls-fast-import starts Label Studio with its feature flag
fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short=true: import_predictions then
recounts only the tasks it wrote, instead of every task of the project holding a prediction.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import NER_CONFIG  # noqa: E402
from tests.fake_llm import FakeLLM  # noqa: E402
from tests.processes import backend_env, run_label_studio  # noqa: E402

GAZETTEER = {"Ada Lovelace": "PER", "Oslo": "LOC", "Royal Society": "ORG"}
CAP = 16
LS_FAST_IMPORT = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"
IMPORT_CHUNK = 5000  # tasks imported per call when making a project


def text(i: int) -> str:
    return f"Note {i}: Ada Lovelace wrote to the Royal Society from Oslo." if i % 4 else f"Note {i}: nothing here."


def load() -> float:
    return os.getloadavg()[0]


def make_project(ls, title: str, n: int) -> int:
    client = ls.client()
    project = client.projects.create(title=title, label_config=NER_CONFIG)
    started = time.monotonic()
    for start in range(0, n, IMPORT_CHUNK):
        client.projects.import_tasks(id=project.id, request=[{"text": text(i)} for i in range(start, min(n, start + IMPORT_CHUNK))])
    while (count := int(ls.api("GET", f"/api/projects/{project.id}").json().get("task_number") or 0)) < n:
        time.sleep(1)  # a large import may finish in the background
    print(f"  imported {count} tasks into project {project.id} in {time.monotonic() - started:.1f} s", flush=True)
    return project.id


def written(ls, project_id: int) -> int:
    response = ls.api("GET", f"/api/projects/{project_id}")
    return int(response.json().get("total_predictions_number") or 0)


def job_command(ls, project_id: int) -> list[str]:
    return [sys.executable, "-m", "backend", "prelabel", "--project", str(project_id), "--yes", "--quiet",
            "--concurrency", str(CAP), "--label-studio-url", ls.url, "--api-key", ls.token]


@dataclass
class JobRun:
    wall: float = 0.0
    code: int | None = None
    peak_mb: float = 0.0
    rss_at_quarters: list[float] = field(default_factory=list)  # MB once 25/50/75/100 % were written
    first_request: float | None = None  # seconds from the start
    last_answer: float | None = None
    mean_in_flight: float = 0.0  # between the first request and the last answer
    in_flight_at_kill: int = 0
    load_start: float = 0.0
    load_end: float = 0.0


def _status_mb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_job(ls, fake, project_id: int, model_dir: Path, n: int, kill_at: int | None = None) -> JobRun:
    """One job process, watched every 0.5 s (RSS, tasks written) and its calls in flight every 50 ms."""
    env = backend_env(fake.base_url, model_dir, LOG_LEVEL="WARNING")
    result = JobRun(load_start=load())
    calls_before = len(fake.requests)
    in_flight: list[tuple[float, int]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            in_flight.append((time.monotonic(), fake.in_flight))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.monotonic()
    sampler.start()
    proc = subprocess.Popen(job_command(ls, project_id), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    quarters = [n * q // 4 for q in (1, 2, 3, 4)]
    while proc.poll() is None:
        result.peak_mb = max(result.peak_mb, _status_mb(proc.pid, "VmHWM") or 0.0)
        count = written(ls, project_id)
        while quarters and count >= quarters[0]:
            quarters.pop(0)
            result.rss_at_quarters.append(_status_mb(proc.pid, "VmRSS") or 0.0)
        if kill_at is not None and count >= kill_at:
            result.in_flight_at_kill = fake.in_flight
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.5)
    result.wall = time.monotonic() - started
    sampling.set()
    sampler.join()
    result.code = proc.returncode
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode not in (0, -signal.SIGKILL):
        print(out[-2000:])
    requests, answers = fake.request_times[calls_before:], fake.reply_times[calls_before:]
    if requests and answers:
        result.first_request, result.last_answer = requests[0] - started, answers[-1] - started
        busy = [count for at, count in in_flight if requests[0] <= at <= answers[-1]]
        result.mean_in_flight = sum(busy) / len(busy) if busy else 0.0
    result.load_end = load()
    return result


def configure(fake: FakeLLM, latency: float) -> None:
    fake.reset()
    fake.gazetteer = dict(GAZETTEER)
    fake.latency, fake.max_concurrency = latency, CAP


def measure_run(ls, fake, n: int, latency: float, title: str) -> None:
    configure(fake, latency)
    project_id = make_project(ls, title, n)
    with tempfile.TemporaryDirectory() as model_dir:
        run = run_job(ls, fake, project_id, Path(model_dir), n)
    ideal = math.ceil(n / CAP) * latency
    count = written(ls, project_id)
    ratio = f"{run.wall / ideal:.3f}x the ideal {ideal:.1f} s" if ideal else "no ideal (latency 0)"
    loads = f"load {run.load_start:.2f} -> {run.load_end:.2f}"
    print(f"  wall {run.wall:.1f} s, {ratio} ({loads}); exit {run.code}")
    if run.first_request is not None and run.last_answer is not None:
        print(f"  first LLM request after {run.first_request:.1f} s, last answer at {run.last_answer:.1f} s, the job ended "
              f"{run.wall - run.last_answer:.1f} s later; {run.mean_in_flight:.2f} calls in flight on average in between")
    print(f"  {count / run.wall:.1f} tasks/s written into Label Studio ({count} of {n}); LLM calls {len(fake.requests)} "
          f"({len(fake.requests) - n:+d} against N)")
    quarters = ", ".join(f"{mb:.0f}" for mb in run.rss_at_quarters)
    print(f"  job peak RSS {run.peak_mb:.0f} MB; RSS at 25/50/75/100 % written: {quarters} MB ({loads})", flush=True)


def measure_kill(ls, fake, n: int, latency: float) -> None:
    configure(fake, latency)
    print(f"kill: {n} tasks, SIGKILL at half way, then the same command again", flush=True)
    project_id = make_project(ls, "bench kill", n)
    with tempfile.TemporaryDirectory() as model_dir:
        first = run_job(ls, fake, project_id, Path(model_dir), n, kill_at=n // 2)
        at_kill, calls_at_kill = written(ls, project_id), len(fake.requests)
        second = run_job(ls, fake, project_id, Path(model_dir), n)
    count, calls = written(ls, project_id), len(fake.requests)
    bound = 1.01 * n + first.in_flight_at_kill
    print(f"  killed with {at_kill} written, {calls_at_kill} LLM calls made, {first.in_flight_at_kill} in flight "
          f"(load {first.load_end:.2f}); resumed: exit {second.code}, {second.wall:.1f} s (load {second.load_end:.2f})")
    print(f"  predictions in Label Studio {count} of {n}; LLM calls over both runs {calls} ({calls / n:.4f} N) against "
          f"1.01 N + {first.in_flight_at_kill} in flight = {bound:.0f}: {'within' if calls <= bound else 'ABOVE'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--runs", type=int, default=1, help="measure the run this many times (a new project each)")
    parser.add_argument("--skip-kill", action="store_true")
    parser.add_argument("--ls-fast-import", action="store_true", help=f"start Label Studio with {LS_FAST_IMPORT}=true")
    args = parser.parse_args()
    n = args.tasks
    if args.ls_fast_import:
        os.environ[LS_FAST_IMPORT] = "true"  # run_label_studio passes the environment on
    fake = FakeLLM()
    fake.server.handle_error = lambda request, address: None  # a killed job's connections reset: expected here
    with run_label_studio() as ls:
        for i in range(args.runs):
            print(f"run {i + 1}: {n} tasks, fake latency {args.latency * 1000:.0f} ms, at most {CAP} served at once"
                  + (", Label Studio's memory-efficient prediction import on" if args.ls_fast_import else ""), flush=True)
            measure_run(ls, fake, n, args.latency, f"bench run {i + 1}")
        if not args.skip_kill:
            measure_kill(ls, fake, n, args.latency)
    fake.close()


if __name__ == "__main__":
    main()
