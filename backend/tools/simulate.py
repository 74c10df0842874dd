"""`simulate`: the learning curve of the fit() loop, without annotators.

A fixed held-out part of the ground truth is set aside. The rest is replayed in order as if
annotators corrected it: each task's ground truth goes through the webhook handler the backend's
fit() runs, into an example store of a throwaway MODEL_DIR (a project's real examples are never
touched). After every point of the schedule (0, 5, 10, ... corrections), the held-out part is
pre-labeled by the real pipeline (selection from the store, prompts, LLM, alignment) and scored.
The answer: F1 and cost per point, and the first point where a target F1 is reached.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from backend.tools.diagnosis import error_table, task_counts, worst_tasks
from backend.tools.evaluation import EvaluationError
from backend.tools.goldset import GoldSet, GoldTask, sample
from backend.tools.runs import Configuration, Run, Workspace, replay, run_configuration
from backend.tools.scorer import Report, score

DEFAULT_SCHEDULE = (0, 5, 10, 20, 50, 100, 200)


def parse_schedule(text: str) -> list[int]:
    try:
        points = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise EvaluationError(f"--schedule must be comma-separated whole numbers, like 0,5,10,20 (got {text!r})") from None
    if not points or points[0] < 0:
        raise EvaluationError(f"--schedule must be comma-separated whole numbers from 0 up (got {text!r})")
    return points


@dataclass
class Point:
    corrections: int
    report: Report
    run: Run

    def to_json(self) -> dict[str, Any]:
        figures = self.run.to_json()
        return {
            "corrections": self.corrections,
            "strict_f1": self.report.micro["strict"].f1,
            "strict_precision": self.report.micro["strict"].precision,
            "strict_recall": self.report.micro["strict"].recall,
            "partial_f1": self.report.micro["partial"].f1,
            "macro_f1": self.report.macro["strict"].f1,
            "per_label_f1": {label: scores["strict"].f1 for label, scores in self.report.per_label.items()},
            **figures,
        }


@dataclass
class Simulation:
    source: str
    configuration: Configuration
    labels: list[str]
    holdout: list[GoldTask]
    stream: list[GoldTask]
    points: list[Point] = field(default_factory=list)
    target: float | None = None
    seed: int = 0
    left_out: list[int] = field(default_factory=list)  # schedule points beyond the stream

    @property
    def reached_at(self) -> int | None:
        if self.target is None:
            return None
        for point in self.points:
            if point.report.micro["strict"].f1 >= self.target:
                return point.corrections
        return None

    def to_json(self, worst: int = 5) -> dict[str, Any]:
        last = self.points[-1]
        gold = [t.gold for t in self.holdout]
        counts = task_counts(gold, last.run.predicted, self.labels)
        return {
            "kind": "simulate",
            "source": self.source,
            "configuration": {"name": self.configuration.name, **self.configuration.describe()},
            "labels": self.labels,
            "seed": self.seed,
            "holdout": len(self.holdout),
            "holdout_tasks": [t.name for t in self.holdout],
            "stream": len(self.stream),
            "schedule_left_out": self.left_out,
            "target_f1": self.target,
            "reached_at": self.reached_at,
            "points": [p.to_json() for p in self.points],
            # the last point in full, as `evaluate` reports one model
            "final": {
                "name": f"after {last.corrections} corrections",
                **last.report.to_json(),
                "errors": error_table(gold, last.run.predicted, self.labels),
                "worst_tasks": worst_tasks([t.name for t in self.holdout], [t.text for t in self.holdout], gold,
                                           last.run.predicted, counts, worst),
            },
        }

    def describe(self) -> str:
        s = self.configuration.settings
        lines = [
            f"ground truth: {self.source}; {len(self.holdout)} held-out tasks scored, {len(self.stream)} replayed as corrections",
            f"model {s.llm_model}, FEW_SHOT_K={s.few_shot_k}, FEW_SHOT_TOKEN_BUDGET={s.few_shot_token_budget}",
        ]
        if self.left_out:
            lines.append(f"schedule points beyond the {len(self.stream)} corrections available, left out: "
                         + ", ".join(map(str, self.left_out)))
        header = (f"{'corrections':>11}{'examples':>10}{'strict P':>10}{'R':>7}{'F1':>7}{'partial F1':>12}{'macro F1':>10}"
                  f"{'tokens':>10}{'cost $':>10}{'failed':>8}")
        lines += ["", header, "-" * len(header)]
        for p in self.points:
            figures = p.run.to_json()
            strict = p.report.micro["strict"]
            cost = figures["usage"]["cost_usd"]
            tokens = p.run.usage.prompt_tokens + p.run.usage.completion_tokens
            lines.append(
                f"{p.corrections:>11}{figures['examples_per_prompt']:>10.1f}{strict.precision:>10.3f}{strict.recall:>7.3f}"
                f"{strict.f1:>7.3f}{p.report.micro['partial'].f1:>12.3f}{p.report.macro['strict'].f1:>10.3f}"
                f"{tokens:>10}{(f'{cost:.4f}' if cost is not None else '-'):>10}{p.run.failed:>8}"
            )
        if self.target is not None:
            reached = self.reached_at
            lines.append("")
            lines.append(f"target strict F1 {self.target:.3f}: " + (
                f"reached after {reached} corrections" if reached is not None
                else f"not reached within {self.points[-1].corrections} corrections"))
        return "\n".join(lines)


def split(tasks: Sequence[GoldTask], holdout: int | None, seed: int, shuffle: bool) -> tuple[list[GoldTask], list[GoldTask]]:
    """(held-out tasks, the stream of corrections): a random held-out part drawn with `seed`, the rest in
    task order (shuffled with the same seed when asked)."""
    if len(tasks) < 2:
        raise EvaluationError(
            f"simulate needs at least 2 annotated tasks (one to learn from, one to score); there are {len(tasks)}"
        )
    size = holdout if holdout is not None else max(1, round(len(tasks) * 0.2))
    if not 1 <= size < len(tasks):
        raise EvaluationError(f"--holdout must be between 1 and {len(tasks) - 1} (the other tasks are the corrections)")
    rng = random.Random(seed)
    held = set(rng.sample(range(len(tasks)), size))
    stream = [t for i, t in enumerate(tasks) if i not in held]
    if shuffle:
        rng.shuffle(stream)
    return [t for i, t in enumerate(tasks) if i in held], stream


def simulate(
    gold: GoldSet,
    configuration: Configuration,
    *,
    schedule: Sequence[int] = DEFAULT_SCHEDULE,
    holdout: int | None = None,
    target: float | None = None,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool = False,
    cache_dir: str | None = None,
    progress: bool = True,
) -> Simulation:
    if target is not None and not 0 < target <= 1:
        raise EvaluationError("--target must be an F1 between 0 and 1")
    held, stream = split(sample(gold.tasks, limit, seed), holdout, seed, shuffle)
    points = [k for k in sorted(set(schedule)) if k <= len(stream)]
    left_out = [k for k in sorted(set(schedule)) if k > len(stream)]
    if not points:
        raise EvaluationError(f"no schedule point is within the {len(stream)} corrections available")
    simulation = Simulation(
        gold.description, configuration, gold.labels, held, stream, target=target, seed=seed, left_out=left_out
    )
    bar = tqdm(total=len(points) * len(held), unit="task", desc="simulating", file=sys.stderr, disable=not progress)
    try:
        with Workspace(cache_dir) as workspace:
            store = workspace.store()  # throwaway: a temporary MODEL_DIR of this run only
            done = 0
            for k in points:
                replay(store, gold.schema, stream[done:k], configuration.settings, first_id=done + 1)
                done = k
                bar.set_postfix_str(f"after {k} corrections")
                run = run_configuration(configuration, held, gold.schema, workspace, store, tick=bar.update)
                report = score([t.gold for t in held], run.predicted, labels=gold.labels)
                simulation.points.append(Point(k, report, run))
    finally:
        bar.close()
    return simulation
