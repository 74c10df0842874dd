"""Entity-level precision, recall and F1 of predicted spans against gold spans, with nervaluate.

Two schemes (SemEval-2013 as nervaluate implements them):
  strict   same boundaries and same label;
  partial  overlapping boundaries count half, labels ignored (per label: within that label's entities).
Per label, micro (all entities pooled) and macro (unweighted mean of the per-label figures).

Spans are character offsets, end exclusive, as Label Studio stores them; nervaluate wants inclusive
ends, so they are converted here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from nervaluate import Evaluator

SCHEMES = ("strict", "partial")
SpanTuple = tuple[int, int, str]  # (start, end exclusive, label)


@dataclass
class Scores:
    precision: float = 0.0
    recall: float = 0.0
    f1: float = 0.0
    correct: int = 0
    incorrect: int = 0
    partial: int = 0
    missed: int = 0
    spurious: int = 0
    gold: int = 0  # nervaluate's "possible"
    predicted: int = 0  # nervaluate's "actual"


@dataclass
class Report:
    labels: list[str]
    documents: int
    gold_entities: int
    predicted_entities: int
    micro: dict[str, Scores] = field(default_factory=dict)  # scheme -> scores
    macro: dict[str, Scores] = field(default_factory=dict)  # scheme -> scores (P/R/F1 only)
    per_label: dict[str, dict[str, Scores]] = field(default_factory=dict)  # label -> scheme -> scores

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _entities(spans: Iterable[SpanTuple]) -> list[dict[str, Any]]:
    return [{"label": label, "start": start, "end": max(start, end - 1)} for start, end, label in spans]


def _scores(result: Any) -> Scores:
    return Scores(
        precision=float(result.precision),
        recall=float(result.recall),
        f1=float(result.f1),
        correct=result.correct,
        incorrect=result.incorrect,
        partial=result.partial,
        missed=result.missed,
        spurious=result.spurious,
        gold=result.possible,
        predicted=result.actual,
    )


def score(
    gold: Sequence[Iterable[SpanTuple]],
    predicted: Sequence[Iterable[SpanTuple]],
    labels: Iterable[str] | None = None,
) -> Report:
    """Score document by document: `gold[i]` and `predicted[i]` are the spans of the same text.

    `labels` limits the evaluation to those labels; only labels seen in gold or predicted are reported.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold documents but {len(predicted)} predicted ones")
    true = [_entities(doc) for doc in gold]
    pred = [_entities(doc) for doc in predicted]
    seen = {e["label"] for doc in true + pred for e in doc}
    # a label with neither gold nor predicted entities has no figures: left out, so macro is not dragged to 0
    chosen = sorted(seen & set(labels) if labels is not None else seen)
    report = Report(
        labels=chosen,
        documents=len(true),
        gold_entities=sum(1 for doc in true for e in doc if e["label"] in chosen),
        predicted_entities=sum(1 for doc in pred for e in doc if e["label"] in chosen),
    )
    if true:
        results = Evaluator(true, pred, tags=chosen, loader="dict").evaluate()
    else:
        results = {"overall": {}, "entities": {}}
    for scheme in SCHEMES:
        overall = results["overall"].get(scheme)
        report.micro[scheme] = _scores(overall) if overall is not None else Scores()
        for label in chosen:
            found = results["entities"].get(label, {}).get(scheme)
            report.per_label.setdefault(label, {})[scheme] = _scores(found) if found is not None else Scores()
        per = [report.per_label[label][scheme] for label in chosen]
        report.macro[scheme] = Scores(
            precision=sum(s.precision for s in per) / len(per) if per else 0.0,
            recall=sum(s.recall for s in per) / len(per) if per else 0.0,
            f1=sum(s.f1 for s in per) / len(per) if per else 0.0,
        )
    return report


def format_table(report: Report) -> str:
    """A plain-text table: one row per label, then micro and macro; strict and partial side by side."""
    header = (
        f"{'label':<14}{'gold':>6}{'pred':>6}"
        f"  {'strict P':>8}{'R':>7}{'F1':>7}  {'partial P':>9}{'R':>7}{'F1':>7}"
    )
    lines = [header, "-" * len(header)]

    def row(name: str, by_scheme: dict[str, Scores], counts: bool = True) -> str:
        strict, partial = by_scheme["strict"], by_scheme["partial"]
        gold = f"{strict.gold:>6}" if counts else f"{'':>6}"
        pred = f"{strict.predicted:>6}" if counts else f"{'':>6}"
        return (
            f"{name:<14}{gold}{pred}"
            f"  {strict.precision:>8.3f}{strict.recall:>7.3f}{strict.f1:>7.3f}"
            f"  {partial.precision:>9.3f}{partial.recall:>7.3f}{partial.f1:>7.3f}"
        )

    for label in report.labels:
        lines.append(row(label, report.per_label[label]))
    lines.append("-" * len(header))
    lines.append(row("micro", report.micro))
    lines.append(row("macro", report.macro, counts=False))
    lines.append(
        f"{report.documents} texts, {report.gold_entities} gold entities, {report.predicted_entities} predicted"
    )
    return "\n".join(lines)
