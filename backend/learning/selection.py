"""Few-shot examples: choosing which stored corrections to show for a new text.

Selection (see `ExampleIndex.select`): BM25 relevance to the new text, then label coverage (each
label shown at least once when some example has it), then diversity (maximal marginal relevance:
near-duplicates of an example already chosen lose), all under `k` and a token budget.

Words are runs of word characters; in scripts written without spaces (Chinese, Japanese, Thai...)
a run is a whole clause, so there the words are its overlapping character pairs (中美关系 -> 中美,
美关, 关系), the usual stand-in for words in Chinese retrieval.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
from rank_bm25 import BM25Okapi

from backend.ner.mentions import FewShotExample, entities_json
from backend.spans.alignment import UNSPACED_CLASS

_WORD = re.compile(r"\w+", re.UNICODE)
_UNSPACED_RUN = re.compile(f"[{UNSPACED_CLASS}]+")
# an example that shares this share of its words with one already chosen adds nothing
NEAR_DUPLICATE = 0.9
# weight of "unlike what is already chosen" against "like the new text" (MMR's 1 - lambda)
DIVERSITY = 0.3
# candidates per example wanted that the greedy choice considers (and per label, for coverage)
SHORTLIST = 8


def tokens(text: str) -> list[str]:
    words = _WORD.findall(text.lower())
    if text.isascii():
        return words
    found: list[str] = []
    for word in words:
        runs = _UNSPACED_RUN.split(word) if _UNSPACED_RUN.search(word) else None
        if runs is None:
            found.append(word)
            continue
        found.extend(run for run in runs if run)  # what sits between the runs: Latin words, digits
        for run in _UNSPACED_RUN.findall(word):
            found.extend([run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)])
    return found


def token_cost(example: FewShotExample) -> int:
    """Rough prompt tokens for the example's two turns: ~4 characters a token, plus the turn framing."""
    return (len(example.text) + len(entities_json(example.entities))) // 4 + 30


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class ExampleIndex:
    """A BM25 index over one example set; built once per set (the store keys it by fingerprint)."""

    def __init__(self, examples: Sequence[FewShotExample]):
        self.examples = list(examples)
        self._tokens = [tokens(e.text) for e in self.examples]
        self._sets = [frozenset(t) for t in self._tokens]
        self._labels = [e.labels for e in self.examples]
        self._costs = [token_cost(e) for e in self.examples]
        # BM25Okapi divides by the mean document length: it needs at least one non-empty document
        self._bm25 = BM25Okapi(self._tokens) if any(self._tokens) else None
        self._postings = self._build_postings() if self._bm25 is not None else {}
        self._similarity: dict[tuple[int, int], float] = {}
        # per label, the examples that have it; per text, the examples made from it (to leave out)
        by_label: dict[str, list[int]] = {}
        for i, labels in enumerate(self._labels):
            for label in labels:
                by_label.setdefault(label, []).append(i)
        self._by_label = {label: np.array(ids) for label, ids in by_label.items()}
        self._by_text: dict[str, list[int]] = {}
        for i, e in enumerate(self.examples):
            self._by_text.setdefault(e.text, []).append(i)

    def __len__(self) -> int:
        return len(self.examples)

    def similarity(self, i: int, j: int) -> float:
        """Word-set Jaccard of two stored examples: fixed for the index, so computed once per pair
        (selection for every new task compares the same shortlisted examples again)."""
        key = (i, j) if i < j else (j, i)
        value = self._similarity.get(key)
        if value is None:
            value = self._similarity[key] = _jaccard(self._sets[i], self._sets[j])
        return value

    def _build_postings(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """term -> (documents, BM25 term weights): rank_bm25 scores by looping over every document
        for every query word; postings touch only documents that match."""
        bm25 = self._bm25
        docs: dict[str, list[int]] = {}
        weights: dict[str, list[float]] = {}
        for d, freqs in enumerate(bm25.doc_freqs):
            norm = bm25.k1 * (1 - bm25.b + bm25.b * bm25.doc_len[d] / bm25.avgdl)
            for term, f in freqs.items():
                docs.setdefault(term, []).append(d)
                weights.setdefault(term, []).append(f * (bm25.k1 + 1) / (f + norm))
        # idf folded into the weights: a query then only gathers and sums
        return {t: (np.array(docs[t]), bm25.idf.get(t, 0.0) * np.array(weights[t])) for t in docs}

    def bm25_scores(self, text: str) -> np.ndarray:
        """Equal to `BM25Okapi.get_scores` (see the tests), computed from the postings."""
        if self._bm25 is None:
            return np.zeros(len(self.examples))
        # a repeated query word adds its weight each time (as get_scores does): once, times its count;
        # all matching postings are summed in one bincount rather than one numpy call per word
        counted = Counter(tokens(text))
        postings = self._postings
        docs, weights, counts = [], [], []
        # most words of a text are in no example: skip them in C. Sorted: the same summing order in
        # every process (set order follows the per-process string hash), so equal inputs rank alike
        for term in sorted(counted.keys() & postings.keys()):
            posting = postings[term]
            docs.append(posting[0])
            weights.append(posting[1])
            counts.append(counted[term])
        if not docs:
            return np.zeros(len(self.examples))
        repeat = np.repeat(counts, [len(d) for d in docs])
        return np.bincount(np.concatenate(docs), np.concatenate(weights) * repeat, minlength=len(self.examples))

    def relevance(self, text: str) -> list[float]:
        scores = self.bm25_scores(text)
        top = float(scores.max()) if len(scores) else 0.0
        return [max(float(s), 0.0) / top if top > 0 else 0.0 for s in scores]

    def _ranked(self, relevance: Sequence[float], text: str) -> np.ndarray:
        """Example indices, most relevant first (ties: stored order), without those made from `text`
        (the same task predicted again: it would hand the model its answer)."""
        order = np.argsort(-np.asarray(relevance), kind="stable")
        same = self._by_text.get(text)
        return order[~np.isin(order, same)] if same else order

    def _shortlist(self, ranked: np.ndarray, labels: Sequence[str], k: int) -> list[int]:
        """The greedy choice below is quadratic: run it on the most relevant few, plus, for each label,
        the most relevant examples that have it (so coverage still finds a rare label deep in the
        ranking). Computed per label with numpy: a Python loop over every example was the slowest part."""
        top = SHORTLIST * k
        if len(ranked) <= top:
            return ranked.tolist()  # every example is on the shortlist already
        position = np.empty(len(self.examples), dtype=np.int64)
        position[:] = len(self.examples)  # left-out examples rank after everything
        position[ranked] = np.arange(len(ranked))
        extra: set[int] = set()
        for label in dict.fromkeys(labels):
            having = self._by_label.get(label)
            if having is None:
                continue
            where = position[having]
            where = where[(where >= top) & (where < len(ranked))]
            extra.update(np.partition(where, SHORTLIST - 1)[:SHORTLIST].tolist() if len(where) > SHORTLIST else where.tolist())
        return ranked[:top].tolist() + ranked[sorted(extra)].tolist()

    def select(self, text: str, labels: Sequence[str], k: int, token_budget: int) -> list[FewShotExample]:
        """Up to `k` examples for `text` whose total `token_cost` stays within `token_budget`.

        The result is ordered least relevant first, so the closest example sits next to the new text.
        """
        if k <= 0 or not self.examples:
            return []
        relevance = self.relevance(text)
        candidates = self._shortlist(self._ranked(relevance, text), labels, k)  # in ranking order
        if self._all_fit(candidates, k, token_budget):
            # the greedy choice below would take every candidate: skip it (the usual case of a small set)
            return [self.examples[i] for i in reversed(candidates)]
        chosen: list[int] = []
        budget = token_budget
        uncovered = set(labels)

        def mmr(i: int) -> float:
            overlap = max((self.similarity(i, j) for j in chosen), default=0.0)
            return (1 - DIVERSITY) * relevance[i] - DIVERSITY * overlap

        def usable(i: int) -> bool:
            if i in chosen or self._costs[i] > budget:
                return False
            return all(self.similarity(i, j) < NEAR_DUPLICATE for j in chosen)

        while len(chosen) < k:
            pool = [i for i in candidates if usable(i)]
            if not pool:
                break
            covering = [i for i in pool if self._labels[i] & uncovered]
            if covering:
                # coverage first: most new labels, then the best relevance/diversity trade-off
                best = max(covering, key=lambda i: (len(self._labels[i] & uncovered), mmr(i)))
            else:
                best = max(pool, key=mmr)
            chosen.append(best)
            budget -= self._costs[best]
            uncovered -= self._labels[best]
        # least relevant first; ties in reverse ranking order too, so the order never depends on the picking
        taken = set(chosen)
        return [self.examples[i] for i in reversed(candidates) if i in taken]

    def _all_fit(self, candidates: Sequence[int], k: int, token_budget: int) -> bool:
        """Whether every candidate can be shown: no more than k, within the budget, no near-duplicates."""
        if len(candidates) > k or sum(self._costs[i] for i in candidates) > token_budget:
            return False
        return all(self.similarity(i, j) < NEAR_DUPLICATE for a, i in enumerate(candidates) for j in candidates[a + 1 :])
