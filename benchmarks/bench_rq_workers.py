"""Project jobs on RQ (REDIS_URL) with 1, 2 and 4 `llm-ner worker` processes, against a real Label
Studio 1.23.2, a real redis-server and the fake OpenAI-compatible server (tests/fake_llm.py). Prints
figures; asserts nothing.

    .venv/bin/python benchmarks/bench_rq_workers.py
    .venv/bin/python benchmarks/bench_rq_workers.py --tasks 2000 --capped-tasks 960 --workers 1,2

free    the provider is not the limit (fake latency 0, no cap): tasks/s of the job (from its start to
        its last part) and the scaling from 1 to 2 workers
capped  the provider is the limit (fake cap 16, latency 300 ms, serving 16 requests at once and
        queueing the rest; each worker keeps 16 calls in flight, PREDICT_CONCURRENCY=16): wall time
        against the ideal ceil(N/16) x 0.3 s

Every run has a project, a MODEL_DIR (SQLite, shared by the workers: one host; --postgresql: a
database of its own in a cluster the benchmark starts) and an empty cache of its own; the time is
the job's, from its start (the planner's first page) to its last part, with the workers started
and idle before. The CPU seconds of every process over the run (Label Studio, the workers, Redis,
PostgreSQL, the planner, the fake LLM in this process) say where the time goes; spread over the
cores they give the fastest the machine could go (the cores' ceiling). The load average is printed
next to the figures: the machine may be shared.

--ls-fast-import starts Label Studio with its feature flag
fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short=true: import_predictions then
recounts only the tasks it wrote, instead of every task of the project holding a prediction.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import NER_CONFIG  # noqa: E402
from tests.fake_llm import FakeLLM  # noqa: E402
from tests.processes import backend_env, run_label_studio, run_postgres, run_redis, run_worker, wait_until  # noqa: E402

GAZETTEER = {"Ada Lovelace": "PER", "Oslo": "LOC", "Royal Society": "ORG"}
CAP, LATENCY = 16, 0.3
LS_FAST_IMPORT = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"


def texts(n: int) -> list[str]:
    return [f"Note {i}: Ada Lovelace wrote to the Royal Society from Oslo." if i % 4 else f"Note {i}: nothing here." for i in range(n)]


def make_project(ls, title: str, n: int) -> int:
    client = ls.client()
    project = client.projects.create(title=title, label_config=NER_CONFIG)
    for start in range(0, n, 2000):
        client.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts(n)[start : start + 2000]])
    return project.id


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU time of a process and (children) its waited-for children (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11 : 15 if children else 13]) / os.sysconf("SC_CLK_TCK")


def planner_seconds() -> float:
    """CPU time of this process's waited-for children: the `llm-ner prelabel` that plans the job."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(ls, redis, fake, workers: int, n: int, concurrency: int, part: int, pg=None) -> tuple[float, int, str, dict[str, float], str]:
    """(seconds from the job's start to its end, tasks done, load average, CPU seconds over the job of
    Label Studio, the workers, Redis, the planner (`llm-ner prelabel`) and the fake LLM (this process) of one job on `workers` workers."""
    from redis import Redis
    from rq import Worker

    from backend.infra.storage import Database
    from backend.pipeline.jobs.records import Jobs

    project_id = make_project(ls, f"rq {workers}w {n}", n)
    model_dir = Path(tempfile.mkdtemp(prefix="bench-rq-"))
    connection = Redis.from_url(redis.url)
    connection.flushall()
    store = {}
    if pg is not None:  # a database of the run's own, over TCP as another host would reach it
        name = f"bench_{model_dir.name.replace('-', '_')}"
        pg.admin(f"CREATE DATABASE {name}")
        store = {"DATABASE_URL": pg.tcp_url(name)}
    env = backend_env(fake.base_url, model_dir, LOG_LEVEL="WARNING", LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token,
                      REDIS_URL=redis.url, JOB_PART=str(part), PREDICT_CONCURRENCY=str(concurrency), **store)
    with ExitStack() as stack:
        procs = [stack.enter_context(run_worker(env, model_dir / f"worker-{i}.log")) for i in range(workers)]
        if not wait_until(lambda: len({w.pid for w in Worker.all(connection=connection)}) == workers, timeout=60):
            raise RuntimeError("the workers did not start")
        pids = {"Label Studio": [ls.proc.pid], "workers": [p.pid for p in procs], "Redis": [redis.proc.pid]}
        before = {name: sum(cpu_seconds(pid) for pid in group) for name, group in pids.items()}
        pg_before = postgres_seconds(pg) if pg is not None else 0.0
        fake_before, planner_before = cpu_seconds(os.getpid(), children=False), planner_seconds()
        done = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", str(project_id), "--yes", "--quiet",
                               "--label-studio-url", ls.url, "--api-key", ls.token], cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stdout + done.stderr)
        cpu = {name: sum(cpu_seconds(pid) for pid in group) - before[name] for name, group in pids.items()}
        if pg is not None:
            cpu["PostgreSQL"] = postgres_seconds(pg) - pg_before
        cpu["planner"] = planner_seconds() - planner_before
        cpu["fake LLM"] = cpu_seconds(os.getpid(), children=False) - fake_before
    db = Database.open(model_dir, store.get("DATABASE_URL"))
    (job,) = Jobs(db).list(limit=1)
    db.close()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    # the fake's clock is monotonic, the job's is the wall clock
    started = job["started_at"] - (time.time() - time.monotonic())
    busy = (fake.reply_times[-1] - fake.request_times[0]) if fake.reply_times else 0.0
    phases = (f"first LLM request {fake.request_times[0] - started:.2f} s after the start, the job ended "
              f"{job['finished_at'] - job['started_at'] - (fake.reply_times[-1] - started):.2f} s after the last answer, "
              f"{sum(b - a for a, b in zip(fake.request_times, fake.reply_times)) / busy if busy else 0:.1f} calls in flight on average")
    return job["finished_at"] - job["started_at"], job["done"], load, cpu, phases


def postgres_seconds(pg) -> float:
    """CPU time of the postmaster, its live children (a process per connection) and its ended ones."""
    postmaster = int((pg.socket_dir / "data" / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return cpu_seconds(postmaster) + sum(cpu_seconds(pid) for pid in children)


def cpu_line(cpu: dict[str, float]) -> str:
    return "CPU s: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in cpu.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000, help="tasks of the 'free' runs (default 1000)")
    parser.add_argument("--capped-tasks", type=int, default=480, help="tasks of the 'capped' runs (default 480)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts (default 1,2,4)")
    parser.add_argument("--ls-fast-import", action="store_true", help=f"start Label Studio with {LS_FAST_IMPORT}=true")
    parser.add_argument("--postgresql", action="store_true",
                        help="the workers share a PostgreSQL database (a cluster of the run's own) instead of SQLite")
    parser.add_argument("--part", type=int, default=100, help="JOB_PART (default 100, the setting's default)")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    if args.ls_fast_import:
        os.environ[LS_FAST_IMPORT] = "true"  # run_label_studio passes the environment on
    fake = FakeLLM()
    with run_label_studio() as ls, run_redis() as redis, (run_postgres(durable=True) if args.postgresql else nullcontext()) as pg:
        print(f"store: {'PostgreSQL (TCP, durable commits)' if pg else 'SQLite in one MODEL_DIR'}")
        print(f"free: fake latency 0, no cap, {args.tasks} tasks, 4 calls in flight per worker, JOB_PART={args.part}")
        rates = {}
        for workers in counts:
            fake.reset()
            fake.gazetteer = dict(GAZETTEER)
            wall, done, load, cpu, _ = run(ls, redis, fake, workers, args.tasks, 4, args.part, pg)
            rates[workers] = done / wall
            # every process's CPU seconds over the job (the planner's start-up is not the job's) spread over
            # the cores: the fastest this machine could go if nothing ever waited
            ceiling = done / (sum(v for k, v in cpu.items() if k != "planner") / (os.cpu_count() or 1))
            print(f"  {workers} worker(s): {wall:6.1f} s, {rates[workers]:6.1f} tasks/s, {len(fake.requests)} LLM calls;"
                  f" {cpu_line(cpu)}; the cores' ceiling {ceiling:.0f} tasks/s (load average {load})", flush=True)
        if 1 in rates and 2 in rates:
            print(f"  scaling 1 -> 2 workers: {rates[2] / rates[1]:.2f}x")
        ideal = math.ceil(args.capped_tasks / CAP) * LATENCY
        print(f"capped: fake latency {LATENCY * 1000:.0f} ms, cap {CAP}, {args.capped_tasks} tasks, ideal {ideal:.1f} s")
        for workers in counts:
            fake.reset()
            fake.gazetteer = dict(GAZETTEER)
            fake.latency, fake.max_concurrency = LATENCY, CAP
            wall, done, load, cpu, phases = run(ls, redis, fake, workers, args.capped_tasks, CAP, args.part, pg)
            print(f"  {workers} worker(s): {wall:6.1f} s = {wall / ideal:.2f}x the ideal, {done} done, {len(fake.requests)} LLM calls;"
                  f" {cpu_line(cpu)} (load average {load})\n    {phases}", flush=True)
    fake.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
