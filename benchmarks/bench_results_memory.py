"""Peak memory of `llm-ner prelabel --batch-results` against the size of the results file, in a real
Label Studio 1.23.2 with the fake OpenAI server (tests/fake_llm.py). Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_results_memory.py                    # 50 MB and 200 MB files
    .venv/bin/python benchmarks/bench_results_memory.py --sizes 50 --code /path/to/older/checkout

For each size: a project of --tasks wikigold sentences, their requests written by `--batch-file-out`,
a results file answering each of them (the fake's own answers) and padded with answer lines of other
requests (unmatched: read, checked and counted, never stored) up to the size, then `prelabel
--batch-results` in a child process whose peak RSS (ru_maxrss) is read when it ends. `--code` runs
the CLI of another checkout (its own `.venv`), to compare with an older version.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backend.tools.conll import build_units, read_files  # noqa: E402
from tests.conftest import NER_CONFIG, WIKIGOLD, gazetteer_for  # noqa: E402
from tests.fake_llm import FakeLLM  # noqa: E402
from tests.processes import backend_env, run_label_studio  # noqa: E402


def make_project(ls, title: str, texts: list[str]) -> int:
    client = ls.client()
    project = client.projects.create(title=title, label_config=NER_CONFIG)
    client.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts])
    return project.id


def child(code: Path, env: dict[str, str], *args: str) -> tuple[int, float, float, str]:
    """(exit code, peak RSS in MB, wall seconds, output) of `llm-ner ARGS` run from `code`."""
    python = code / ".venv" / "bin" / "python"
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([str(python), "-m", "backend", *args], cwd=code, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return proc.returncode, usage.ru_maxrss / 1024, time.monotonic() - started, text


def results_file(path: Path, fake: FakeLLM, requests: list[dict], megabytes: int) -> int:
    """Answers to `requests`, then answer lines of other requests up to `megabytes`; returns its lines."""
    target = megabytes * 1024 * 1024
    lines = 0
    with path.open("w") as out:
        for request in requests:
            body = fake.completion(request["body"], fake.gazetteer_reply(request["body"]))
            out.write(json.dumps({"custom_id": request["custom_id"], "error": None, "response": {"status_code": 200, "body": body}}) + "\n")
            lines += 1
        # an unmatched line the size of a real answer to a long text (about 2 kB)
        filler_body = fake.completion(requests[0]["body"], fake.gazetteer_reply(requests[0]["body"]))
        filler_body["choices"][0]["message"]["content"] = json.dumps(
            {"entities": [{"text": f"Entity number {i}", "label": "ORG"} for i in range(40)]})
        while out.tell() < target:
            out.write(json.dumps({"custom_id": f"ner-{lines:040x}", "error": None,
                                  "response": {"status_code": 200, "body": filler_body}}) + "\n")
            lines += 1
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200], help="results files' sizes in MB")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose CLI runs (default: this one)")
    args = parser.parse_args()
    units = build_units(read_files([WIKIGOLD]), per="sentence")[: args.tasks]
    fake = FakeLLM()
    fake.gazetteer = gazetteer_for(units, drop_label="MISC")
    rows = []
    with run_label_studio() as ls, tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            project_id = make_project(ls, f"results {size} MB", [u.text for u in units])
            model_dir = Path(tmp) / f"model-{size}"
            env = backend_env(fake.base_url, model_dir, LOG_LEVEL="WARNING")
            common = ["prelabel", "--project", str(project_id), "--quiet", "--url", ls.url, "--api-key", ls.token]
            requests_path, results_path = Path(tmp) / f"requests-{size}.jsonl", Path(tmp) / f"results-{size}.jsonl"
            code, _, _, out = child(args.code, env, *common, "--batch-file-out", str(requests_path))
            if code != 0:
                raise SystemExit(out[-2000:])
            requests = [json.loads(line) for line in requests_path.read_text().splitlines()]
            lines = results_file(results_path, fake, requests, size)
            code, peak, wall, out = child(args.code, env, *common, "--batch-results", str(results_path), "--yes")
            summary = [line for line in out.splitlines() if " pre-labeled, " in line]
            rows.append((size, results_path.stat().st_size / 1e6, lines, peak, wall, code, summary[0] if summary else out[-300:]))
            results_path.unlink()
    fake.close()
    print(f"code: {args.code}; {args.tasks} tasks per project")
    print(f"{'file MB':>8}{'lines':>10}{'peak RSS MB':>13}{'wall s':>9}{'exit':>6}  outcome")
    for _, megabytes, lines, peak, wall, code, summary in rows:
        print(f"{megabytes:>8.1f}{lines:>10}{peak:>13.0f}{wall:>9.1f}{code:>6}  {summary}")


if __name__ == "__main__":
    main()
