"""Confidence scores for spans and tasks, from what the endpoint gives us.

Span score, in order of preference:
1. token logprobs (when the endpoint returns them): the probability the model gave to writing this
   entity's `text` and `label` values, exp(sum of the logprobs of the tokens inside those two JSON
   strings). A surface the model hesitated over, or a label it nearly chose otherwise, scores low.
2. agreement between samples (LLM_SAMPLES = n > 1): the share of the n answers that list the
   entity with that label. Entities listed by fewer than half of the answers are left out.
3. otherwise no score.

Task score: the lowest span score of the task (a task is as doubtful as its most doubtful span), or,
for a task with no span, the confidence that there is none (the probability of the whole empty
answer, or the share of samples that were empty). Sorting by it in Label Studio puts the tasks most
worth a human look first.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence

from backend.ner.mentions import Mention


def _token_offsets(tokens: Sequence[tuple[str, float]]) -> list[tuple[int, int, float]]:
    offsets, position = [], 0
    for token, logprob in tokens:
        offsets.append((position, position + len(token), logprob))
        position += len(token)
    return offsets


def _find_json_string(content: str, value: str, start: int, end: int) -> tuple[int, int] | None:
    """Character range of `value`'s JSON string (without its quotes) in content[start:end]."""
    for encoded in (json.dumps(value, ensure_ascii=False), json.dumps(value)):
        at = content.find(encoded, start, end)
        if at != -1:
            return at + 1, at + len(encoded) - 1
    return None


def logprob_scores(content: str | None, tokens: Sequence[tuple[str, float]] | None, entities: Sequence[Mention]) -> list[float | None]:
    """One score per entity (in the order the answer lists them), None where it cannot be located."""
    if not content or not tokens or "".join(t for t, _ in tokens) != content:
        return [None] * len(entities)
    offsets = _token_offsets(tokens)
    scores: list[float | None] = []
    cursor = 0
    for surface, label in entities:
        if not surface or not label:  # an unusable entity (dropped later): nothing to locate
            scores.append(None)
            continue
        text_range = _find_json_string(content, surface, cursor, len(content))
        if text_range is None:
            scores.append(None)
            continue
        # the entity's object: from its opening brace to its closing one (keys may come in any order)
        obj_start = content.rfind("{", 0, text_range[0])
        obj_end = content.find("}", text_range[1])
        obj_end = len(content) if obj_end == -1 else obj_end
        label_range = _find_json_string(content, label, max(obj_start, 0), obj_end)
        ranges = [text_range] + ([label_range] if label_range else [])
        total = sum(lp for a, b, lp in offsets if any(a < r_end and b > r_start for r_start, r_end in ranges))
        scores.append(probability(total))
        cursor = obj_end
    return scores


def probability(logprob: float) -> float | None:
    """exp(logprob), within [0, 1] whatever the endpoint sent: a logprob is at most 0, but a server may
    send +50 (1e65 as a score), NaN or infinities (no score: JSON has no NaN)."""
    if not math.isfinite(logprob):
        return 0.0 if logprob == -math.inf else None
    return round(math.exp(min(0.0, logprob)), 4)


def answer_probability(tokens: Sequence[tuple[str, float]] | None) -> float | None:
    if not tokens:
        return None
    return probability(sum(lp for _, lp in tokens))


def agreement(samples: Sequence[Sequence[Mention]]) -> tuple[list[Mention], dict[Mention, float]]:
    """Entities listed by at least half of the samples, each scored by the share of samples listing it.

    The order (and repeated mentions) follow the first sample, then the agreed entities it missed.
    """
    if not samples:
        return [], {}
    present = Counter(entity for sample in samples for entity in set(sample))
    share = {entity: round(count / len(samples), 4) for entity, count in present.items()}
    kept = {entity for entity, value in share.items() if value >= 0.5}
    entities = [e for e in samples[0] if e in kept]
    for sample in samples[1:]:
        for entity in sample:
            if entity in kept and entity not in entities:
                entities.append(entity)
    return entities, {e: share[e] for e in kept}


def empty_share(samples: Sequence[Sequence[Mention]]) -> float | None:
    return round(sum(1 for s in samples if not s) / len(samples), 4) if samples else None


def task_score(span_scores: Sequence[float | None], empty_answer_score: float | None = None) -> float | None:
    known = [s for s in span_scores if s is not None]
    if known:
        return min(known)
    if not span_scores:
        return empty_answer_score
    return None
