"""Long texts: overlapping chunks that fit the LLM's context budget, and their spans merged back.

Chunks are cut where a human would: after a paragraph break, else a line break, else a sentence end,
else any whitespace, in the second half of the budget; a text with none of those (CJK without
punctuation, one huge token) is cut anywhere that splits no grapheme cluster. Each chunk after the
first starts inside the previous one (`overlap` characters at most), at the earliest word start
allowed, so an entity cut by a seam is whole in the next chunk when it is shorter than the overlap.

Merging: each chunk's answer is aligned inside the chunk's window of the original text (offsets are
the text's own, word boundaries judged on the whole text). The same span seen by two chunks is kept
once; of two different overlapping spans seen by different chunks, the one farther from its chunk's
cut edge wins (it had more context). Then the usual overlap rule and `label_all_mentions` apply to
the whole text, as for a short text.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from backend.spans.alignment import Aligner, Alignment, Prefer, Span, resolve, splits_cluster

_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_LINE = re.compile(r"\n\s*")
_SENTENCE = re.compile(r"[.!?;:\u3002\uff01\uff1f\uff1b\u061f\u06d4\u0964][\"'\u201d\u2019)\]]*\s+|[\u3002\uff01\uff1f\u3001\uff0c]")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Chunk:
    start: int
    end: int


def _safe(text: str, i: int) -> int:
    """The nearest position at or before i that splits no grapheme cluster."""
    while i > 0 and splits_cluster(text, i):
        i -= 1
    return i


def _last_cut(text: str, lo: int, hi: int) -> int | None:
    """The latest good cut in [lo, hi]: just after a paragraph, line, sentence or word break."""
    for pattern in (_PARAGRAPH, _LINE, _SENTENCE, _SPACE):
        best = None
        for match in pattern.finditer(text, lo, hi):
            best = match.end()
        if best is not None and best > lo:
            return best
    return None


def _first_start(text: str, lo: int, hi: int) -> int | None:
    """The earliest word start in [lo, hi): the earliest, so that the overlap is as long as allowed."""
    match = _SPACE.search(text, lo, hi)
    if match is not None and match.end() < hi:
        return match.end()
    return None


def split(text: str, budget: int, overlap: int = 0) -> list[Chunk]:
    """Chunks of at most `budget` characters covering `text`, consecutive ones sharing at most `overlap`."""
    if budget < 1 or overlap < 0 or overlap * 2 > budget:
        raise ValueError("need budget >= 1 and 0 <= overlap <= budget / 2")
    n = len(text)
    if n <= budget:
        return [Chunk(0, n)]
    chunks: list[Chunk] = []
    start = 0
    while True:
        limit = start + budget
        if limit >= n:
            chunks.append(Chunk(start, n))
            return chunks
        end = _last_cut(text, start + budget // 2, limit) or _safe(text, limit)
        if end < start + budget // 2:
            # a grapheme cluster longer than half the budget straddles the limit (a letter with
            # thousands of combining marks): cut inside it, or the chunks would barely move on
            end = limit
        chunks.append(Chunk(start, end))
        if overlap:
            lo = max(start + 1, end - overlap)
            next_start = _first_start(text, lo, end) or _safe(text, lo)
            if next_start <= start:
                # inside one grapheme cluster longer than the budget (a letter with thousands of
                # combining marks): no safe start exists, so start where the overlap does; stepping
                # back to the cluster's start made one chunk (and one LLM call) per character
                next_start = lo
        else:
            next_start = end
        start = next_start


def align_chunks(
    text: str,
    chunks: Sequence[Chunk],
    answers: Sequence[Sequence[tuple[str, str] | tuple[str, str, str | None]]],
    *,
    label_all_mentions: bool = True,
    allow_overlap: bool = False,
    prefer: Prefer = "longest",
) -> Alignment:
    """Align each chunk's answer in its window, merge across seams, then resolve on the whole text."""
    aligner = Aligner(text)
    dropped: Counter = Counter()
    matched: Counter = Counter()
    # (start, end) -> (margin, chunk index, span, surface as listed): the best-placed view per extent
    views: dict[tuple[int, int], tuple[float, int, Span, str]] = {}
    seen_by: dict[tuple[int, int], set[int]] = {}  # extent -> the chunks that listed it
    for index, (chunk, answer) in enumerate(zip(chunks, answers, strict=True)):
        listed, chunk_dropped, chunk_matched = aligner.walk(
            answer, lo=chunk.start, hi=chunk.end, allow_overlap=allow_overlap
        )
        dropped.update(chunk_dropped)
        matched.update(chunk_matched)
        for span, surface in listed:
            margin = min(
                span.start - chunk.start if chunk.start > 0 else math.inf,
                chunk.end - span.end if chunk.end < len(text) else math.inf,
            )
            key = (span.start, span.end)
            seen_by.setdefault(key, set()).add(index)
            if key not in views or margin > views[key][0]:
                views[key] = (margin, index, span, surface)

    # seams: two overlapping spans that no chunk listed together are two views of one region
    # (e.g. "New" at a chunk's cut, "New York" in the next chunk): the better-placed view wins
    ordered = sorted(views.values(), key=lambda v: (v[2].start, v[2].end))
    losers: set[int] = set()
    for i, (margin, index, span, _) in enumerate(ordered):
        if i in losers:
            continue
        j = i + 1
        while j < len(ordered) and ordered[j][2].start < span.end:
            other_margin, other_index, other, _ = ordered[j]
            if j not in losers and not seen_by[(span.start, span.end)] & seen_by[(other.start, other.end)]:
                if (margin, -index) >= (other_margin, -other_index):
                    losers.add(j)
                else:
                    losers.add(i)
                    break
            j += 1
    dropped["seam"] += len(losers)
    listed = [(view[2], view[3]) for k, view in enumerate(ordered) if k not in losers]

    spans, added = resolve(
        aligner, listed, label_all_mentions=label_all_mentions, allow_overlap=allow_overlap, prefer=prefer, dropped=dropped
    )
    return Alignment(spans=spans, dropped=+dropped, matched=matched, added=added, hinted=aligner.hinted)
