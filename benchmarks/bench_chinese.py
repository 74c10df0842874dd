"""One-character names in Chinese text: the alignment with and without occurrence hints.

    .venv/bin/python benchmarks/bench_chinese.py [path/to/file.conll] [--examples N]

The data (tests/data/zh/news.bio.conll, written for this project) is Chinese news sentences, one
character a line, dense with one-character names that also occur inside ordinary words before
them (中 in 年中 before 中美关系, 美 in 美好, 日 in 日记, 马 in 马上). Each sentence (and then the
whole file as one text) gets the answer a perfect model would give, aligned and scored against gold
(strict, nervaluate), as in bench_alignment.py:

- plain: every gold mention in order, as (text, label);
- hinted: the same with the occurrence hints the Chinese prompt asks for (a context copied around
  each entity of one or two characters or repeated in the text; backend/ner/task.py `needs_hint`);
- hinted, half the hints spoilt: every other hint replaced by one that is not in the text (the
  aligner must fall back to the plain walk);
- lazy: each distinct (text, label) once, no hints (what LABEL_ALL_MENTIONS is for).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_alignment import lazy, oracle, run

from backend.ner.task import needs_hint, occurrence_context
from backend.tools.conll import build_units, read_conll

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "zh" / "news.bio.conll"


def hinted(unit, spoil_every: int = 0) -> list[tuple[str, str, str | None]]:
    """Every gold mention in order, with a hint where the prompt asks for one."""
    answer = []
    asked = 0
    for entity in sorted(unit.entities, key=lambda e: e.start):
        hint = None
        if needs_hint(unit.text, entity.text):
            hint = occurrence_context(unit.text, entity.start, entity.end)
            asked += 1
            if spoil_every and asked % spoil_every == 0:
                hint = "※" + hint[::-1]  # found nowhere in the text
        answer.append((entity.text, entity.label, hint))
    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--examples", type=int, default=6, help="mismatches shown per run")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"bench_chinese: no such file: {args.data}", file=sys.stderr)
        return 2
    for per in ("sentence", "document"):
        units = build_units(read_conll(args.data), per=per)
        one_char = sum(len(e.text) == 1 for u in units for e in u.entities)
        print(f"\n##### {args.data.name}, one text per {per}: {len(units)} texts, {sum(len(u.text) for u in units):,}"
              f" characters, {sum(len(u.entities) for u in units)} gold entities ({one_char} of one character)")
        answers = {
            "plain answer (every gold mention in order)": [oracle(u) for u in units],
            "hinted answer (as the Chinese prompt asks)": [hinted(u) for u in units],
            "hinted answer, every other hint spoilt": [hinted(u, spoil_every=2) for u in units],
        }
        for title, answer in answers.items():
            for all_mentions in (False, True):
                run(units, answer, label_all_mentions=all_mentions, show=args.examples, title=title)
        for all_mentions in (True, False):
            run(units, [lazy(u) for u in units], label_all_mentions=all_mentions, show=args.examples,
                title="lazy answer (each distinct surface and label once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
