"""Span alignment on real data: oracle round-trip, perturbed and lazy answers, and speed.

    .venv/bin/python benchmarks/bench_alignment.py [path/to/wikigold.conll.txt] [--examples N]

Each wikigold document (IOB1, tokens joined by spaces, sentences by newlines: backend/conll.py) gets
the JSON answer an ideal LLM would give, which goes through the alignment engine and is scored against
gold with nervaluate (backend/scorer.py, strict: same boundaries and label). Mismatches are listed by
category. Then the same with perturbed answers and lazy answers, and the speed on a 1 MB text.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.spans.alignment import align
from backend.tools.conll import build_units, read_conll
from backend.tools.scorer import score

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "wikigold" / "wikigold.conll.txt"
QUOTES = str.maketrans({"'": "\u2019", '"': "\u201c"})


def oracle(unit) -> list[tuple[str, str]]:
    """Every gold mention, in order of appearance."""
    return [(e.text, e.label) for e in sorted(unit.entities, key=lambda e: e.start)]


def lazy(unit) -> list[tuple[str, str]]:
    """Each distinct (surface, label) once, in order of first appearance."""
    return list(dict.fromkeys(oracle(unit)))


def perturb(unit, rng: random.Random) -> list[tuple[str, str]]:
    """Changed case, extra spaces, curly quotes, and one hallucinated entity per document."""
    answer = []
    for surface, label in oracle(unit):
        how = rng.randrange(4)
        if how == 0:
            surface = surface.upper() if rng.random() < 0.5 else surface.lower()
        elif how == 1:
            surface = surface.replace(" ", "  ") if " " in surface else f" {surface}  "
        elif how == 2:
            surface = surface.translate(QUOTES)
        answer.append((surface, label))
    answer.insert(rng.randrange(len(answer) + 1), ("Zorblax Quintessor", rng.choice(["PER", "ORG", "LOC", "MISC"])))
    return answer


def categorise(unit, spans, added: set) -> Counter:
    """Why predicted and gold differ, one count per mismatching entity."""
    gold = {(e.start, e.end, e.label) for e in unit.entities}
    pred = {(s.start, s.end, s.label) for s in spans}
    by_extent = {(s, e): label for s, e, label in gold}
    categories: Counter = Counter()
    missed = gold - pred
    for start, end, label in sorted(pred - gold):
        text = unit.text[start:end]
        if (start, end) in by_extent:
            categories["wrong label"] += 1
        elif any(s < end and start < e for s, e, _ in missed):
            categories["wrong boundaries"] += 1
        elif any(unit.text[s:e] == text for s, e, _ in missed):
            categories["mention taken at another occurrence"] += 1
        elif (start, end, label) in added:
            categories["extra mention (LABEL_ALL_MENTIONS)"] += 1
        else:
            categories["spurious"] += 1
    covered = {(s, e) for s, e, _ in pred}
    for start, end, _ in missed:
        if (start, end) not in covered and not any(s < end and start < e for s, e in covered):
            categories["missed"] += 1
    return categories


def run(units, answers, *, label_all_mentions: bool, show: int = 0, title: str = "") -> dict:
    gold_docs, pred_docs = [], []
    categories: Counter = Counter()
    dropped: Counter = Counter()
    matched: Counter = Counter()
    examples = []
    for unit, answer in zip(units, answers):
        result = align(unit.text, answer, label_all_mentions=label_all_mentions)
        for span in result.spans:
            assert unit.text[span.start : span.end] == span.text
        listed = {(s, e) for s, e in ((sp.start, sp.end) for sp in result.spans)}
        added = set()
        if label_all_mentions:  # which spans the listed items did not produce
            plain = align(unit.text, answer, label_all_mentions=False)
            base = {(s.start, s.end, s.label) for s in plain.spans}
            added = {(s.start, s.end, s.label) for s in result.spans} - base
        del listed
        gold_docs.append([(e.start, e.end, e.label) for e in unit.entities])
        pred_docs.append([(s.start, s.end, s.label) for s in result.spans])
        found = categorise(unit, result.spans, added)
        categories.update(found)
        dropped.update(result.dropped)
        matched.update(result.matched)
        if found and len(examples) < show:
            gold = {(e.start, e.end, e.label) for e in unit.entities}
            pred = {(s.start, s.end, s.label) for s in result.spans}
            for s, e, label in sorted(gold ^ pred)[: show - len(examples)]:
                side = "gold only" if (s, e, label) in gold else "predicted only"
                context = unit.text[max(0, s - 30) : e + 30].replace("\n", " ")
                examples.append(f"    {side:>14} {label:<5} {unit.text[s:e]!r:<28} …{context}…")
    report = score(gold_docs, pred_docs)
    strict = report.micro["strict"]
    print(f"\n{title} (LABEL_ALL_MENTIONS {'on' if label_all_mentions else 'off'})")
    print(f"  strict micro P {strict.precision:.4f}  R {strict.recall:.4f}  F1 {strict.f1:.4f}"
          f"   (gold {strict.gold}, predicted {strict.predicted})")
    print("  per label F1: " + "  ".join(f"{l} {report.per_label[l]['strict'].f1:.4f}" for l in report.labels))
    print(f"  found by tier: {dict(matched)}   dropped: {dict(+dropped)}")
    print(f"  mismatches: {dict(categories) or 'none'}")
    for line in examples:
        print(line)
    return {"f1": strict.f1, "categories": categories}


def megabyte(units, target_chars: int = 1_000_000, entities: int = 10_000):
    """wikigold documents repeated to 1 MB; the oracle answer thinned evenly to `entities` items."""
    parts, answer, offset = [], [], 0
    while offset < target_chars:
        for unit in units:
            parts.append(unit.text + "\n\n")
            answer.extend(oracle(unit))
            offset += len(unit.text) + 2
            if offset >= target_chars:
                break
    text = "".join(parts)
    step = len(answer) / entities
    thinned = [answer[int(i * step)] for i in range(entities)]
    return text, answer, thinned


def timed(text, answer, repeat: int, **options) -> tuple[float, float, object]:
    """Best wall-clock and best CPU time of `repeat` runs (the CPU figure is steadier on a shared machine)."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = align(text, answer, **options)
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return min(walls), min(cpus), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--examples", type=int, default=8, help="mismatches shown per run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--speed-only", action="store_true", help="only the 1 MB timing")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"bench_alignment: no such file: {args.data}", file=sys.stderr)
        return 2
    units = build_units(read_conll(args.data), per="document")
    print(f"{args.data.name}: {len(units)} documents, {sum(len(u.text) for u in units):,} characters, "
          f"{sum(len(u.entities) for u in units):,} gold entities")

    if not args.speed_only:
        round_trips(units, args.examples)
    speed(units, args.repeat)
    return 0


def round_trips(units, examples: int) -> None:
    for all_mentions in (False, True):
        run(units, [oracle(u) for u in units], label_all_mentions=all_mentions, show=examples, title="oracle answer")
    rng = random.Random(13)
    perturbed = [perturb(u, rng) for u in units]
    for all_mentions in (False, True):
        run(units, perturbed, label_all_mentions=all_mentions, show=examples,
            title="perturbed answer (case, spaces, curly quotes, 1 hallucination per document)")
    for all_mentions in (True, False):
        run(units, [lazy(u) for u in units], label_all_mentions=all_mentions, show=0,
            title="lazy answer (each distinct surface and label once)")



def speed(units, repeat: int) -> None:
    text, full, thinned = megabyte(units)
    print(f"\nspeed: {len(text):,} characters ({len(text.encode()):,} bytes UTF-8), best of {repeat} runs"
          f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    for name, answer, options in [
        (f"{len(thinned):,} entities, LABEL_ALL_MENTIONS off", thinned, {"label_all_mentions": False}),
        (f"{len(thinned):,} entities, LABEL_ALL_MENTIONS on", thinned, {"label_all_mentions": True}),
        (f"{len(full):,} entities (every mention), off", full, {"label_all_mentions": False}),
    ]:
        wall, cpu, result = timed(text, answer, repeat, **options)
        print(f"  {name:<50} {wall * 1000:7.1f} ms wall {cpu * 1000:7.1f} ms CPU  ({len(result.spans):,} spans)")
    rng = random.Random(7)
    messy = [(s.upper() if rng.random() < 0.1 else s, label) for s, label in thinned]
    wall, cpu, result = timed(text, messy, repeat, label_all_mentions=False)
    print(f"  {'10% of them upper-cased (case, normalised tiers)':<50} {wall * 1000:7.1f} ms wall {cpu * 1000:7.1f} ms CPU")
    tracemalloc.start()
    align(text, thinned, label_all_mentions=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"  peak memory of one align (on), tracemalloc: {peak / 1e6:.1f} MB")


if __name__ == "__main__":
    sys.exit(main())
