"""`compare`: several systems side by side on the same ground truth, and whether their differences are real.

A system is a model version already stored in a project (its predictions are read, nothing is sent)
or a configuration run now (`runs.py`). Every system is scored on the same tasks, in the same order:
strict and partial P/R/F1 per label, micro and macro (`scorer.py`), plus for configurations tokens,
cost and latency.

A difference in micro F1 between two systems comes with a paired bootstrap interval over tasks:
the tasks are resampled with replacement (the same draw for both systems), micro F1 recomputed from
the resampled per-task counts, and the 2.5th and 97.5th percentiles of the difference taken. When
that interval contains 0, the difference is within what another draw of tasks could reverse: noise.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from backend.tools.diagnosis import error_table, micro_f1, task_counts, worst_tasks
from backend.tools.evaluation import EvaluationError
from backend.tools.goldset import GoldSet, GoldTask, sample
from backend.tools.runs import Configuration, Run, Workspace, replay, run_configuration
from backend.tools.scorer import Report, SpanTuple, score

SCHEMES = ("strict", "partial")
BATCH = 200  # resamples drawn at a time: resamples x tasks x 5 counts stays small


@dataclass
class System:
    name: str
    kind: str  # "configuration" or "model version"
    predicted: list[list[SpanTuple]]
    details: dict[str, Any]
    run: Run | None = None
    report: Report | None = None
    counts: np.ndarray | None = None


@dataclass
class Difference:
    a: str
    b: str
    scheme: str
    observed: float  # micro F1 of a minus that of b, on all the tasks
    low: float
    high: float
    share_not_better: float  # share of resamples where a did not beat b
    resamples: int

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def verdict(self) -> str:
        if not self.significant:
            return "noise: the interval contains 0"
        better, worse = (self.a, self.b) if self.low > 0 else (self.b, self.a)
        return f"{better} is better than {worse}"

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "metric": f"{self.scheme} micro F1", "difference": self.observed,
            "low": self.low, "high": self.high, "confidence": 0.95, "resamples": self.resamples,
            "share_not_better": self.share_not_better, "significant": self.significant, "verdict": self.verdict(),
        }


def _figure(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def paired_bootstrap(
    counts_a: np.ndarray, counts_b: np.ndarray, scheme: str = "strict", resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float, float]:
    """(observed difference, 2.5th percentile, 97.5th percentile, share of resamples with a <= b)."""
    if counts_a.shape != counts_b.shape or not len(counts_a):
        raise ValueError("paired bootstrap needs the same tasks, at least one, for both systems")
    observed = float(micro_f1(counts_a.sum(axis=0), scheme) - micro_f1(counts_b.sum(axis=0), scheme))
    rng = np.random.default_rng(seed)
    n = len(counts_a)
    differences = []
    for start in range(0, resamples, BATCH):
        draw = rng.integers(0, n, size=(min(BATCH, resamples - start), n))
        differences.append(micro_f1(counts_a[draw].sum(axis=1), scheme) - micro_f1(counts_b[draw].sum(axis=1), scheme))
    d = np.concatenate(differences)
    low, high = np.percentile(d, [2.5, 97.5])
    return observed, float(low), float(high), float(np.mean(d <= 0))


@dataclass
class Comparison:
    source: str
    tasks: list[GoldTask]
    labels: list[str]
    systems: list[System]
    differences: list[Difference] = field(default_factory=list)
    seed: int = 0
    drawn: bool = False  # the tasks are a --limit sample drawn with the seed
    without_ground_truth: int = 0  # a project's tasks without a submitted annotation
    without_prediction: int = 0  # annotated tasks left out: a compared model version has no prediction for them
    examples: str = "others"

    def to_json(self, worst: int = 5) -> dict[str, Any]:
        texts = [t.text for t in self.tasks]
        names = [t.name for t in self.tasks]
        gold = [t.gold for t in self.tasks]
        systems = []
        for s in self.systems:
            item: dict[str, Any] = {"name": s.name, "kind": s.kind, "details": s.details, **s.report.to_json()}
            if s.run is not None:
                item.update(s.run.to_json())
            item["errors"] = error_table(gold, s.predicted, self.labels)
            item["worst_tasks"] = worst_tasks(names, texts, gold, s.predicted, s.counts, worst)
            systems.append(item)
        return {
            "kind": "compare",
            "source": self.source,
            "tasks": len(self.tasks),
            "task_names": names,
            "drawn": self.drawn,
            "seed": self.seed,
            "without_ground_truth": self.without_ground_truth,
            "without_prediction": self.without_prediction,
            "examples": self.examples,
            "labels": self.labels,
            "systems": systems,
            "differences": [d.to_json() for d in self.differences],
        }

    def describe(self) -> str:
        drawn = f", drawn with seed {self.seed}" if self.drawn else ""
        lines = [f"ground truth: {self.source}; {len(self.tasks)} tasks compared{drawn}"]
        if self.without_ground_truth:
            lines.append(f"{self.without_ground_truth} tasks without ground truth left out")
        if self.without_prediction:
            lines.append(f"{self.without_prediction} annotated tasks left out: a compared model version has no prediction"
                         " for them")
        if any(s.run is not None for s in self.systems):
            lines.append("few-shot examples: " + ("the other annotated tasks (each task's own text is never its example)"
                                                  if self.examples == "others" else "none"))
        lines.append("")
        header = (f"{'system':<16}{'strict P':>9}{'R':>7}{'F1':>7}{'partial F1':>12}{'macro F1':>10}"
                  f"{'tokens':>10}{'cost $':>10}{'p50 s':>8}{'p95 s':>8}{'failed':>8}")
        lines += [header, "-" * len(header)]
        for s in self.systems:
            strict = s.report.micro["strict"]
            row = (f"{s.name[:15]:<16}{strict.precision:>9.3f}{strict.recall:>7.3f}{strict.f1:>7.3f}"
                   f"{s.report.micro['partial'].f1:>12.3f}{s.report.macro['strict'].f1:>10.3f}")
            if s.run is not None:
                figures = s.run.to_json()
                tokens = s.run.usage.prompt_tokens + s.run.usage.completion_tokens
                cost = figures["usage"]["cost_usd"]
                p50, p95 = figures["latency"]["p50"], figures["latency"]["p95"]
                row += (f"{tokens:>10}{_figure(cost, 4):>10}{_figure(p50, 2):>8}{_figure(p95, 2):>8}{s.run.failed:>8}")
            else:
                row += f"{'-':>10}{'-':>10}{'-':>8}{'-':>8}{'-':>8}"
            lines.append(row)
        lines += ["", "strict F1 per label:", f"{'label':<16}" + "".join(f"{s.name[:11]:>12}" for s in self.systems)]
        for label in self.labels:
            cells = []
            for s in self.systems:
                scores = s.report.per_label.get(label)
                cells.append(f"{scores['strict'].f1:>12.3f}" if scores else f"{'-':>12}")
            lines.append(f"{label[:15]:<16}" + "".join(cells))
        if self.differences:
            resamples = self.differences[0].resamples
            lines += ["", f"differences in micro F1, paired bootstrap over tasks ({resamples} resamples, 95% interval):"]
            for d in self.differences:
                lines.append(f"  {d.a} - {d.b} ({d.scheme}): {d.observed:+.3f} [{d.low:+.3f}, {d.high:+.3f}]  {d.verdict()}")
        return "\n".join(lines)


def compare(
    gold: GoldSet,
    configurations: Sequence[Configuration],
    versions: Sequence[str] = (),
    *,
    limit: int | None = None,
    seed: int = 0,
    resamples: int = 1000,
    examples: str = "others",
    cache_dir: str | None = None,
    progress: bool = True,
) -> Comparison:
    """Score stored model versions and run configurations on the same tasks of `gold`.

    `examples`: "others" fills a throwaway store with every annotated task, so each task is
    pre-labeled with examples selected from the other ones (as the backend does once they are all
    corrected); "none" shows no examples."""
    if not configurations and not versions:
        raise EvaluationError("nothing to compare: give --config FILE and/or --model-version V")
    names = [c.name for c in configurations] + list(versions)
    if len(set(names)) != len(names):
        raise EvaluationError(f"two systems share a name: {', '.join(names)}")
    if examples not in ("others", "none"):
        raise EvaluationError("--examples must be 'others' or 'none'")
    unknown = [v for v in versions if v not in gold.versions]
    if unknown:
        raise EvaluationError(
            f"{gold.description} has no predictions of model version {', '.join(map(repr, unknown))}"
            f" (it has: {', '.join(gold.versions) or 'none'})"
        )
    usable = [t for t in gold.tasks if all(v in t.stored for v in versions)]
    if not usable:
        raise EvaluationError("no annotated task has a prediction of every compared model version")
    tasks = sample(usable, limit, seed)

    systems = [System(v, "model version", [t.stored[v] for t in tasks], {"model_version": v}) for v in versions]
    with Workspace(cache_dir) as workspace:
        store = None
        if examples == "others" and any(c.settings.few_shot_k > 0 for c in configurations):
            store = workspace.store()
            replay(store, gold.schema, gold.tasks, configurations[0].settings)
        for configuration in configurations:
            bar = tqdm(total=len(tasks), unit="task", desc=configuration.name, file=sys.stderr, disable=not progress)
            try:
                run = run_configuration(configuration, tasks, gold.schema, workspace, store, tick=bar.update)
            finally:
                bar.close()
            systems.append(System(configuration.name, "configuration", run.predicted, configuration.describe(), run))
    order = {name: i for i, name in enumerate(names)}
    systems.sort(key=lambda s: order[s.name])  # the order the user gave: configurations first, then versions

    gold_spans = [t.gold for t in tasks]
    for s in systems:
        s.report = score(gold_spans, s.predicted, labels=gold.labels)
        s.counts = task_counts(gold_spans, s.predicted, gold.labels)
    differences = []
    for i, a in enumerate(systems):
        for b in systems[i + 1 :]:
            for scheme in SCHEMES:
                observed, low, high, share = paired_bootstrap(a.counts, b.counts, scheme, resamples, seed)
                differences.append(Difference(a.name, b.name, scheme, observed, low, high, share, resamples))
    return Comparison(
        source=gold.description, tasks=tasks, labels=gold.labels, systems=systems, differences=differences,
        seed=seed, drawn=len(tasks) < len(usable), without_ground_truth=gold.without_ground_truth,
        without_prediction=len(gold.tasks) - len(usable), examples=examples,
    )
