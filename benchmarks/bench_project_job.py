"""A whole project pre-labeled by a job (`llm-ner prelabel`), against a real Label Studio 1.23.2 and
the fake OpenAI-compatible server (tests/fake_llm.py). Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_project_job.py                  # 10,000 tasks, 300 ms, cap 16
    .venv/bin/python benchmarks/bench_project_job.py --tasks 100000 --latency 0 --skip-kill

run     the job on N tasks, fake latency L, the fake serving at most 16 requests at once and the job
        16 calls in flight: wall time against the ideal ceil(N/16) x L, tasks/s written into Label
        Studio, the job's peak RSS (VmHWM), LLM calls (should be exactly N)
kill    a second project of N tasks: the job is killed (SIGKILL) at half way and run again; LLM calls
        over both runs against N (a chunk answered but not written when killed is asked again from
        the cache, not the LLM)
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import NER_CONFIG  # noqa: E402
from tests.fake_llm import FakeLLM  # noqa: E402
from tests.processes import backend_env, run_label_studio  # noqa: E402

GAZETTEER = {"Ada Lovelace": "PER", "Oslo": "LOC", "Royal Society": "ORG"}
CAP = 16


def texts(n: int) -> list[str]:
    return [f"Note {i}: Ada Lovelace wrote to the Royal Society from Oslo." if i % 4 else f"Note {i}: nothing here." for i in range(n)]


def make_project(ls, title: str, n: int) -> int:
    client = ls.client()
    project = client.projects.create(title=title, label_config=NER_CONFIG)
    started = time.monotonic()
    for start in range(0, n, 2000):
        client.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts(n)[start : start + 2000]])
    print(f"  imported {n} tasks into project {project.id} in {time.monotonic() - started:.1f} s", flush=True)
    return project.id


def written(ls, project_id: int) -> int:
    response = ls.api("GET", f"/api/projects/{project_id}")
    return int(response.json().get("total_predictions_number") or 0)


def job_command(ls, project_id: int) -> list[str]:
    return [sys.executable, "-m", "backend", "prelabel", "--project", str(project_id), "--yes", "--quiet",
            "--concurrency", str(CAP), "--url", ls.url, "--api-key", ls.token]


def run_job(ls, fake, project_id: int, model_dir: Path, kill_at: int | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MB, exit code or -9) of one job process."""
    env = backend_env(fake.base_url, model_dir, LOG_LEVEL="WARNING")
    started = time.monotonic()
    proc = subprocess.Popen(job_command(ls, project_id), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0.0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            pass
        if kill_at is not None and written(ls, project_id) >= kill_at:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return time.monotonic() - started, peak, -9
        time.sleep(0.5)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        print(out[-2000:])
    return time.monotonic() - started, peak, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--skip-kill", action="store_true")
    args = parser.parse_args()
    n = args.tasks
    fake = FakeLLM()
    fake.gazetteer = dict(GAZETTEER)
    fake.latency, fake.max_concurrency = args.latency, CAP
    with run_label_studio() as ls:
        print(f"run: {n} tasks, fake latency {args.latency * 1000:.0f} ms, at most {CAP} served at once", flush=True)
        project_id = make_project(ls, "bench run", n)
        with tempfile.TemporaryDirectory() as model_dir:
            wall, peak, code = run_job(ls, fake, project_id, Path(model_dir))
        ideal = math.ceil(n / CAP) * args.latency
        count = written(ls, project_id)
        ratio = f"{wall / ideal:.3f}x ideal ({ideal:.1f} s)" if ideal else "no ideal (latency 0)"
        print(f"  wall {wall:.1f} s, {ratio}; {count / wall:.1f} tasks/s written; exit {code}")
        print(f"  predictions in Label Studio {count} of {n}; LLM calls {len(fake.requests)}; job peak RSS {peak:.0f} MB")
        if args.skip_kill:
            return
        fake.reset()
        fake.gazetteer = dict(GAZETTEER)
        fake.latency, fake.max_concurrency = args.latency, CAP
        print(f"kill: {n} tasks, SIGKILL at half way, then the same command again", flush=True)
        project_id = make_project(ls, "bench kill", n)
        with tempfile.TemporaryDirectory() as model_dir:
            first = run_job(ls, fake, project_id, Path(model_dir), kill_at=n // 2)
            at_kill = written(ls, project_id)
            calls_at_kill = len(fake.requests)
            second = run_job(ls, fake, project_id, Path(model_dir))
        count = written(ls, project_id)
        print(f"  killed with {at_kill} written and {calls_at_kill} LLM calls made; resumed: exit {second[2]}, {second[0]:.1f} s")
        print(f"  predictions in Label Studio {count} of {n}; LLM calls over both runs {len(fake.requests)} "
              f"({len(fake.requests) / n:.4f} N; asked again at most: {2 * CAP} in flight + 32 answers not yet flushed to the cache)")
    fake.close()


if __name__ == "__main__":
    main()
