"""Where the errors are: per-task counts, a confusion table of label swaps and boundary errors, the worst tasks.

Every predicted span of a task is matched to at most one gold span, in this order:
  correct        same boundaries, same label;
  label swap     same boundaries, another label (gold label -> predicted label);
  boundary       overlapping but other boundaries (same label, or another label as well),
                 the pair with the largest overlap first;
  missed         a gold span nothing overlaps;   spurious   a predicted span no gold span overlaps.
These are nervaluate's categories (strict "correct" and "incorrect", partial "partial", "missed",
"spurious"), split by what went wrong so a table can show which labels are confused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.tools.scorer import SpanTuple, score

MISSED = "(missed)"
SPURIOUS = "(spurious)"
KINDS = ("correct", "label_swap", "boundary_same_label", "boundary_other_label", "missed", "spurious")

# per-task columns of `task_counts`: what micro figures are sums of (a bootstrap resamples rows)
STRICT_CORRECT, PARTIAL_CORRECT, PARTIAL_OVERLAP, GOLD, PREDICTED = range(5)


Spans = Sequence[Sequence[SpanTuple]]  # per task, its spans


def task_counts(gold: Spans, predicted: Spans, labels: Sequence[str]) -> np.ndarray:
    """One row per task: nervaluate's strict correct, partial correct, partial overlaps, gold and predicted
    entities. nervaluate sums documents, so the columns' sums give exactly `score(...)`'s micro figures."""
    rows = np.zeros((len(gold), 5), dtype=np.int64)
    for i, (g, p) in enumerate(zip(gold, predicted, strict=True)):
        if not g and not p:
            continue
        micro = score([g], [p], labels=labels).micro
        strict, partial = micro["strict"], micro["partial"]
        rows[i] = (strict.correct, partial.correct, partial.partial, strict.gold, strict.predicted)
    return rows


def micro_f1(counts: np.ndarray, scheme: str = "strict") -> np.ndarray:
    """Micro F1 from summed task counts (last axis = the 5 columns); works on one sum or on many."""
    if scheme == "strict":
        hits = counts[..., STRICT_CORRECT]
    else:
        hits = counts[..., PARTIAL_CORRECT] + 0.5 * counts[..., PARTIAL_OVERLAP]
    total = counts[..., GOLD] + counts[..., PREDICTED]
    return np.divide(2.0 * hits, total, out=np.zeros(np.shape(total), dtype=float), where=total > 0)


@dataclass
class Match:
    kind: str
    gold: SpanTuple | None
    predicted: SpanTuple | None


def _overlap(a: SpanTuple, b: SpanTuple) -> int:
    return min(a[1], b[1]) - max(a[0], b[0])


def match(gold: Sequence[SpanTuple], predicted: Sequence[SpanTuple]) -> list[Match]:
    """Pair one task's spans as the module docstring says; every span appears in exactly one Match."""
    g_left, p_left = sorted(gold), sorted(predicted)
    matches: list[Match] = []

    def pair(kind: str, test) -> None:
        for g in list(g_left):
            for p in p_left:
                if test(g, p):
                    matches.append(Match(kind, g, p))
                    g_left.remove(g)
                    p_left.remove(p)
                    break

    pair("correct", lambda g, p: g == p)
    pair("label_swap", lambda g, p: g[:2] == p[:2])
    overlaps = sorted(
        ((_overlap(g, p), g, p) for g in g_left for p in p_left if _overlap(g, p) > 0),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    for _, g, p in overlaps:
        if g in g_left and p in p_left:
            matches.append(Match("boundary_same_label" if g[2] == p[2] else "boundary_other_label", g, p))
            g_left.remove(g)
            p_left.remove(p)
    matches.extend(Match("missed", g, None) for g in g_left)
    matches.extend(Match("spurious", None, p) for p in p_left)
    return matches


def error_table(gold: Spans, predicted: Spans, labels: Sequence[str]) -> dict[str, Any]:
    """The confusion table (gold label x predicted label, for spans with the same boundaries, plus
    missed and spurious) and boundary errors per gold label, with totals per kind."""
    names = list(labels)
    matrix: dict[str, Counter] = {label: Counter() for label in names}
    matrix[SPURIOUS] = Counter()
    boundary: dict[str, Counter] = {label: Counter() for label in names}
    totals: Counter = Counter({kind: 0 for kind in KINDS})
    for g_doc, p_doc in zip(gold, predicted, strict=True):
        for m in match(g_doc, p_doc):
            totals[m.kind] += 1
            if m.kind in ("correct", "label_swap"):
                matrix.setdefault(m.gold[2], Counter())[m.predicted[2]] += 1
            elif m.kind == "missed":
                matrix.setdefault(m.gold[2], Counter())[MISSED] += 1
            elif m.kind == "spurious":
                matrix[SPURIOUS][m.predicted[2]] += 1
            else:
                boundary.setdefault(m.gold[2], Counter())[m.kind] += 1
    return {
        "labels": names,
        "matrix": {row: dict(cells) for row, cells in matrix.items()},
        "boundary": {label: {kind: cells.get(kind, 0) for kind in ("boundary_same_label", "boundary_other_label")}
                     for label, cells in boundary.items()},
        "totals": dict(totals),
    }


def worst_tasks(
    names: Sequence[str], texts: Sequence[str], gold: Spans, predicted: Spans, counts: np.ndarray, n: int,
) -> list[dict[str, Any]]:
    """The `n` tasks with the lowest strict F1 (most errors first among equals); tasks without an error never."""
    f1 = micro_f1(counts)
    errors = counts[:, GOLD] + counts[:, PREDICTED] - 2 * counts[:, STRICT_CORRECT]
    order = sorted((i for i in range(len(names)) if errors[i] > 0), key=lambda i: (f1[i], -errors[i], i))
    worst = []
    for i in order[:n]:
        kinds = Counter(m.kind for m in match(gold[i], predicted[i]))
        worst.append({
            "task": names[i],
            "text": texts[i],
            "gold": [list(s) for s in sorted(gold[i])],
            "predicted": [list(s) for s in sorted(predicted[i])],
            "f1": float(f1[i]),
            "errors": {kind: kinds.get(kind, 0) for kind in KINDS if kind != "correct"},
        })
    return worst
