"""Turn the LLM's (surface, label) entities into exact character spans of the original text.

Every span satisfies `text[start:end] == span.text`: spans are cut from the original string, never
from a normalised copy.

Finding a surface, in three tiers (the first tier that finds a usable occurrence wins):
  1. `exact`: the surface as is;
  2. `case`: ignoring case;
  3. `normalised`: on a folded view of the text (NFKC, case-folded, whitespace runs collapsed to
     one space, curly quotes and dash variants made ASCII, soft hyphens, zero-width and bidi
     control characters removed), mapped back to original offsets through an offset table.
A surface is stripped of surrounding whitespace and invisible format characters (ZWJ, ZWSP, bidi
marks...), and of CJK sentence punctuation (、。，：；！？ and
their full-width forms) at its ends. Every occurrence must sit on word boundaries (`Apple` never matches inside `Pineapple`) and must not
split a grapheme cluster (a base and its combining marks, an emoji ZWJ sequence, CRLF). Scripts
written without spaces (CJK, Thai, Lao, Khmer, Myanmar, Hangul with its particles) need no word
boundary; punctuation at a surface's edge needs none either.

Mention rule: the LLM lists every mention in order of appearance. Walking the list, each item takes
the next occurrence of its surface at or after the previous item's match that no earlier item took
(and, unless overlaps are allowed, that overlaps no earlier item); failing that, the first such
occurrence from the start of the text (the LLM listed out of order). So two mentions of one string
can carry two labels.

Occurrence hints: an item may come with a `context`, a little of the text around the mention copied
by the LLM (`中美关系` for the `中` of 中美关系). Its surface is then looked for inside the occurrences
of the context (as is, else in the folded view), after the cursor first, then from the start; when
the context is not found, or every mention inside it is taken, the item is placed as above. This is
what tells apart the one-character names of unspaced scripts (中 China, 美 USA) from the same
character inside an ordinary word (年中, 美好).

`label_all_mentions`: afterwards, every other occurrence of a matched surface is labelled too, unless
the LLM gave that (normalised) surface more than one label. Such added spans never overlap a span
the LLM listed, and the longer name wins: an occurrence of a listed surface that holds listed
spans wholly inside it (the walk put 中国 on the 中国 of 中国人民银行) takes their place. One exception: an occurrence of a one-character surface of an
unspaced script (a Chinese character, a Thai letter) that touches a letter of such a script on
either side is never added, since without word boundaries there is no telling a name (中 in 中美)
from a piece of a longer word (中 in 年中); standing alone (between punctuation, spaces, digits or
Latin letters) it is added.

Overlaps (one `<Labels>`): unless `allow_overlap`, of two overlapping listed spans the longest wins
(`prefer="longest"`, ties: the earlier start, then the earlier listed) or the earlier listed
(`prefer="first"`). Losers are counted as dropped (`overlap`).
"""

from __future__ import annotations

import bisect
import itertools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import ahocorasick

Prefer = Literal["longest", "first"]
TIERS = ("exact", "case", "normalised")
_NEAR = 20_000  # characters searched after the cursor before anything else
_PLAIN_SCANS = 64  # whole-window searches per text before the occurrence lists (word index) are built
_FEW_SURFACES = 16  # up to this many, every_occurrence scans with str.find instead of an Aho-Corasick automaton


class Span(NamedTuple):
    """A labeled span, `text == original[start:end]`; ordered by (start, end, text, label).
    A named tuple rather than a frozen dataclass: alignment makes ~100 a task, 3x cheaper so."""

    start: int
    end: int
    text: str
    label: str


@dataclass
class Alignment:
    spans: list[Span]
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    matched: Counter = field(default_factory=Counter)  # tier -> count of listed items found by it
    added: int = 0  # spans added by label_all_mentions
    hinted: int = 0  # listed items placed by their occurrence hint


# ---------------------------------------------------------------- characters

# Scripts written without spaces between words: a word boundary cannot be asked for there.
_UNSPACED = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x31F0, 0x31FF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7AF),  # Hangul syllables: particles attach to nouns (서울에서)
    (0xF900, 0xFAFF),
    (0xFF66, 0xFF9F),  # half-width Katakana
    (0x20000, 0x3FFFF),
)
_UNSPACED_CLASS = "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in _UNSPACED)
UNSPACED_CLASS = _UNSPACED_CLASS  # for a regex character class: [{UNSPACED_CLASS}]
# a run of word characters of scripts written with spaces: the unit of the word index
_WORD_RUN = re.compile(f"[^\\W{_UNSPACED_CLASS}]+")
_WORD_RUN_SPLIT = re.compile(f"([^\\W{_UNSPACED_CLASS}]+)")

ZWJ, ZWNJ = "\u200d", "\u200c"
_JOINERS = (ZWJ, ZWNJ)
# removed from the normalised view: invisible, and often present on one side only
_IGNORABLE = "\u00ad\u034f\u061c\u180e\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\ufeff"
_FOLD_TABLE = str.maketrans(
    {
        **{c: "'" for c in "\u2018\u2019\u201a\u201b\u2032\u00b4\u0060"},
        **{c: '"' for c in "\u201c\u201d\u201e\u201f\u2033"},
        **{c: "-" for c in "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"},
        **{c: None for c in _IGNORABLE},
    }
)
# sentence punctuation of CJK text: never part of a name, but LLMs copy it along (`北京。`)
_CJK_STOPS = "\u3001\u3002\uff01\uff0c\uff0e\uff1a\uff1b\uff1f"
# what the folded view must handle char by char; everything else is ASCII copied in place (lowered)
_SPECIAL = re.compile(r"\s{2,}|[^\S ]|[^\x00-\x7f\s]+")
_NEEDS_FOLD = re.compile("[" + "".join(re.escape(chr(c)) for c in _FOLD_TABLE) + "]")


def _unspaced(ch: str) -> bool:
    o = ord(ch)
    return any(a <= o <= b for a, b in _UNSPACED) if o >= 0x0E00 else False


def _continues(ch: str) -> bool:
    """A character that belongs to the grapheme cluster before it."""
    o = ord(ch)
    if o < 0x300:  # nothing below the combining diacritics block continues a cluster
        return False
    return (
        unicodedata.category(ch)[0] == "M"
        or ch in _JOINERS
        or 0xFE00 <= o <= 0xFE0F  # variation selectors
        or 0x1F3FB <= o <= 0x1F3FF  # emoji skin tones
        or 0xE0020 <= o <= 0xE007F  # emoji tag sequences
        or 0xE0100 <= o <= 0xE01EF
    )


def _joins(text: str, k: int) -> bool:
    """Whether the ZWJ at k glues its neighbours into one cluster: in an emoji sequence (a pictograph
    after it) or an Indic conjunct (a virama before it). Elsewhere (before a name, between a Chinese
    character and the next) it is an invisible format character that glues nothing, and a name right
    after or before it is found ("\u200dLondon", "在\u200d北京")."""
    after = text[k + 1] if k + 1 < len(text) else ""
    if after and (unicodedata.category(after) == "So" or 0x1F000 <= ord(after) <= 0x1FAFF):
        return True
    return k > 0 and unicodedata.combining(text[k - 1]) == 9  # a virama (canonical combining class 9)


def _glued(text: str, i: int) -> bool:
    """Whether text[i] belongs to the grapheme cluster of text[i - 1]."""
    if text[i] == ZWJ:
        return _joins(text, i)
    if text[i - 1] == ZWJ:
        return _joins(text, i - 1)
    return _continues(text[i])


def splits_cluster(text: str, i: int) -> bool:
    """Whether cutting `text` at i separates a grapheme cluster (base + marks, ZWJ sequence, CRLF)."""
    if i <= 0 or i >= len(text):
        return False
    return _glued(text, i) or (text[i - 1] == "\r" and text[i] == "\n")


def _cut_ok(text: str, i: int) -> bool:
    """Whether a span may start or end at i: not inside a word (of a script written with spaces),
    not inside a grapheme cluster. The text's ends always qualify."""
    if i <= 0 or i >= len(text):
        return True
    before, after = text[i - 1], text[i]
    if (before.isalnum() or before == "_") and (after.isalnum() or after == "_"):
        if not (_unspaced(before) or _unspaced(after)):
            return False
    return not ((after >= "\u0300" or before in "\u200d\r") and splits_cluster(text, i))


def _fold(piece: str) -> str:
    return unicodedata.normalize("NFKC", piece).casefold().translate(_FOLD_TABLE)


# ---------------------------------------------------------------- the folded view


class FoldedView:
    """The normalised text and a table mapping its indices back to original offsets.

    The table is a list of segments: `linear` ones copy characters one for one (ASCII, and runs that
    folding leaves as they are), the others are one grapheme cluster or whitespace run folded as a
    whole, whose output maps to the whole of its original characters.
    """

    def __init__(self, text: str):
        pieces: list[str] = []
        ns: list[int] = []  # norm start of each segment
        ne: list[int] = []
        os_: list[int] = []  # original start
        oe: list[int] = []
        linear: list[bool] = []
        n = 0

        def add(out: str, start: int, end: int, is_linear: bool) -> None:
            nonlocal n
            if not out:
                return
            pieces.append(out)
            ns.append(n)
            n += len(out)
            ne.append(n)
            os_.append(start)
            oe.append(end)
            linear.append(is_linear)

        pos = 0
        for match in _SPECIAL.finditer(text):
            start, end = match.span()
            run = match.group()
            if start > pos:
                add(text[pos:start].lower(), pos, start, True)
            pos = end
            if run.isspace():
                add(" ", start, end, False)
                continue
            if unicodedata.category(run[0])[0] == "M" and linear and linear[-1] and oe[-1] == start:
                # a combining mark on an ASCII base: fold base and mark together (e + U+0301 = é)
                pieces[-1] = pieces[-1][:-1]
                ne[-1] -= 1
                oe[-1] -= 1
                n -= 1
                if not pieces[-1]:
                    for column in (pieces, ns, ne, os_, oe, linear):
                        column.pop()
                run = text[start - 1] + run
                start -= 1
            if (
                unicodedata.category(run[0])[0] != "M"
                and unicodedata.is_normalized("NFKC", run)
                and run.casefold() == run
                and not _NEEDS_FOLD.search(run)
            ):
                add(run, start, end, True)
                continue
            i = 0
            while i < len(run):
                j = i + 1
                while j < len(run) and _glued(run, j):
                    j += 1
                add(_fold(run[i:j]), start + i, start + j, False)
                i = j
        if pos < len(text):
            add(text[pos:].lower(), pos, len(text), True)
        self.text = "".join(pieces)
        self._ns, self._ne, self._os, self._oe, self._linear = ns, ne, os_, oe, linear

    def to_original(self, start: int, end: int) -> tuple[int, int] | None:
        """Original [start, end) for normalised [start, end); None when it cuts a folded cluster."""
        k = bisect.bisect_right(self._ns, start) - 1
        if self._linear[k]:
            o_start = self._os[k] + (start - self._ns[k])
        elif start == self._ns[k]:
            o_start = self._os[k]
        else:
            return None
        k = bisect.bisect_right(self._ns, end - 1) - 1
        if self._linear[k]:
            o_end = self._os[k] + (end - self._ns[k])
        elif end == self._ne[k]:
            o_end = self._oe[k]
        else:
            return None
        return o_start, o_end


def normalise(surface: str) -> str:
    """The folded form of a surface, as the folded view would show it."""
    if _SPECIAL.search(surface) is None:  # plain ASCII with single spaces: lowering is all there is
        return surface.lower().strip()
    return FoldedView(surface).text.strip()


# ---------------------------------------------------------------- finding occurrences


def _inner(context: str, surface: str) -> list[int]:
    """Where the surface sits in a hint's context, the places nearest its middle first: a context
    is copied around its mention, so of two 中 in `五年中，中美关系经历` the second is meant."""
    places = [j for j in range(len(context) - len(surface) + 1) if context.startswith(surface, j)]
    middle = len(context) - len(surface)  # twice the centred start, to stay in integers
    return sorted(places, key=lambda j: (abs(2 * j - middle), j))


class Aligner:
    """Finds occurrences of surfaces in one text; caches its lowered copy, folded view and word index."""

    def __init__(self, text: str):
        self.text = text
        self._lower: str | None = None
        self._lower_ok: bool | None = None
        self._view: FoldedView | None = None
        self._indexes: dict[str, tuple[list[str], list[int], dict[str, list[int]]]] = {}
        self._expected: dict[str, set[str]] = {"exact": set(), "case": set()}
        self._pending: list[str] = []  # surfaces announced by `expect`, split into words when an index is built
        self._folded: dict[str, str] = {}
        self._plain_scans = 0
        self._occurrences: dict[tuple[str, str], tuple[list[int], list[tuple[int, int]]]] = {}
        self.hinted = 0  # listed items placed by their occurrence hint

    def undecidable(self, start: int, end: int) -> bool:
        """A one-character span of an unspaced script touching a letter of one: a name (中 in 中美)
        or a piece of a longer word (中 in 年中), no telling which."""
        text = self.text
        if end - start != 1 or not _unspaced(text[start]):
            return False
        return (start > 0 and _unspaced(text[start - 1]) and text[start - 1].isalpha()) or (
            end < len(text) and _unspaced(text[end]) and text[end].isalpha()
        )

    # -- boundaries
    def bounded(self, start: int, end: int) -> bool:
        """On word boundaries (where the script has them) and between grapheme clusters."""
        text = self.text
        return start < end and _cut_ok(text, start) and _cut_ok(text, end)

    # -- the three tiers: every bounded occurrence, computed once per surface and tier
    def _scan(self, haystack: str, needle: str, check: bool = True) -> list[tuple[int, int]]:
        found, find, size = [], haystack.find, len(needle)
        i = find(needle)
        while i != -1:
            if not check or self.bounded(i, i + size):
                found.append((i, i + size))
            i = find(needle, i + 1)
        return found

    def _indexed(self, haystack: str, needle: str, name: str, check: bool = True) -> list[tuple[int, int]]:
        """Like _scan, through an index of word runs: candidates are where the needle's rarest word is.

        A word run of a bounded occurrence is a whole word run of the text too (the needle's own
        characters, or a boundary, end it), so the index misses no occurrence.
        """
        rarest = self._rarest(haystack, needle, name)
        if rarest is None:
            return self._scan(haystack, needle, check)
        positions, offset = rarest
        size = len(needle)
        starts = [i - offset for i in positions if i >= offset and haystack.startswith(needle, i - offset)]
        return [(i, i + size) for i in starts if not check or self.bounded(i, i + size)]

    def _rarest(self, haystack: str, needle: str, name: str) -> tuple[list[int], int] | None:
        """Where the needle's rarest word occurs, and that word's offset in the needle."""
        runs = list(_WORD_RUN.finditer(needle))
        if not runs:
            return None
        entry = self._indexes.get(name)
        if entry is None:
            # split() alternates gap, word, gap, word...: cumulative lengths give each word's start
            pieces = _WORD_RUN_SPLIT.split(haystack)
            offsets = list(itertools.accumulate(map(len, pieces), initial=0))
            entry = self._indexes[name] = (pieces[1::2], offsets[1::2], {})
        words, starts, index = entry
        keys = {run.group() for run in runs}
        if not keys <= index.keys():
            # index only the words asked for (and announced by `expect`): a dict of every word costs more
            self._split_pending()
            missing = (self._expected.get(name, set()) | keys) - index.keys()
            for word in missing:
                index[word] = []
            mask = list(map(missing.__contains__, words))  # C-speed passes; Python only for the hits
            for word, start in zip(itertools.compress(words, mask), itertools.compress(starts, mask)):
                index[word].append(start)
        rarest = min(runs, key=lambda run: len(index[run.group()]))
        return index[rarest.group()], rarest.start()

    def expect(self, surfaces: Iterable[str]) -> None:
        """Surfaces about to be looked up: their words are indexed in one pass, if an index is built
        at all (most texts never need one: nearby plain search finds their mentions)."""
        self._pending.extend(surfaces)

    def _split_pending(self) -> None:
        exact, case = self._expected["exact"], self._expected["case"]
        for surface in set(self._pending):
            words = _WORD_RUN.findall(surface)
            exact.update(words)
            case.update(word.lower() for word in words)
        self._pending.clear()

    def folded(self, surface: str) -> str:
        folded = self._folded.get(surface)
        if folded is None:
            folded = self._folded[surface] = normalise(surface)
        return folded

    def _lowered(self) -> str | None:
        if self._lower_ok is None:
            lowered = self.text.lower()
            # lower() never shortens a character, so equal lengths mean one for one
            self._lower_ok = len(lowered) == len(self.text)
            self._lower = lowered if self._lower_ok else None
        return self._lower

    def view(self) -> FoldedView:
        if self._view is None:
            self._view = FoldedView(self.text)
        return self._view

    def _normalised(self, surface: str) -> list[tuple[int, int]]:
        needle = normalise(surface)
        if not needle:
            return []
        view = self.view()
        found, find = [], view.text.find
        i = find(needle)
        while i != -1:
            span = view.to_original(i, i + len(needle))
            if span is not None and self.bounded(*span):
                found.append(span)
            i = find(needle, i + 1)
        return found

    def occurrences(self, tier: str, surface: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(starts, spans) of every bounded occurrence of `surface` found by `tier`, by start."""
        key = (tier, surface)
        cached = self._occurrences.get(key)
        if cached is None:
            if tier == "exact":
                spans = self._indexed(self.text, surface, "exact")
            elif tier == "case":
                lowered = self._lowered()
                if lowered is not None:
                    spans = self._indexed(lowered, surface.lower(), "case")
                else:
                    pattern = re.compile(re.escape(surface), re.IGNORECASE)
                    spans = [m.span() for m in pattern.finditer(self.text) if self.bounded(*m.span())]
            else:
                spans = self._normalised(surface)
            spans = sorted(set(spans))
            cached = ([s for s, _ in spans], spans)
            self._occurrences[key] = cached
        return cached

    def every_occurrence(self, surfaces: Iterable[str], free: bytearray | None = None) -> list[tuple[int, int, str]]:
        """(start, end, surface) of every bounded occurrence of any of the surfaces, as they are;
        with `free`, only those touching no marked (non-zero) byte of it.

        One Aho-Corasick pass over the text finds all of them at once (overlapping ones included):
        for thousands of surfaces in a megabyte this beats a search or an index per surface.
        """
        surfaces = [surface for surface in dict.fromkeys(surfaces) if surface]
        if len(surfaces) <= _FEW_SURFACES:
            # a few surfaces (a short text's usual case): one str.find scan each beats building an automaton
            hits = []
            for surface in surfaces:
                find, size = self.text.find, len(surface)
                i = find(surface)
                while i != -1:
                    hits.append((i, i + size, surface))
                    i = find(surface, i + 1)
        else:
            automaton = ahocorasick.Automaton()
            for surface in surfaces:
                automaton.add_word(surface, surface)
            automaton.make_automaton()
            hits = [(last + 1 - len(surface), last + 1, surface) for last, surface in automaton.iter(self.text)]
        # most are the listed mentions themselves: the cheap test first
        return [hit for hit in hits if (free is None or free.find(1, hit[0], hit[1]) == -1) and self.bounded(hit[0], hit[1])]

    # -- the mention walk
    def walk(
        self,
        entities: Iterable[tuple[str, str] | tuple[str, str, str | None]],
        *,
        lo: int = 0,
        hi: int | None = None,
        allow_overlap: bool = False,
        tiers: tuple[str, ...] = TIERS,
    ) -> tuple[list[tuple[Span, str]], Counter, Counter]:
        """Listed items -> (span, surface as listed) in listing order, drops by reason, finds by tier.

        Items are (surface, label) or (surface, label, context): see "Occurrence hints" above.
        Only occurrences inside the window [lo, hi) are considered (a chunk of a long text); word
        boundaries are still judged on the whole text.
        """
        hi = len(self.text) if hi is None else hi
        found: list[tuple[Span, str]] = []
        dropped: Counter = Counter()
        matched: Counter = Counter()
        taken: set[tuple[int, int]] = set()
        occupied = bytearray(hi - lo)
        cursor = lo
        entities = list(entities)
        self.expect(item[0].strip() for item in entities if item[0])
        for item in entities:
            # invisible format characters at a name's ends (copied along from the text) are no part of it
            surface = (item[0] or "").strip().strip(_IGNORABLE).strip()
            label = item[1]
            if surface and (surface[0] >= "\u3001" or surface[-1] >= "\u3001") and (
                surface[0] in _CJK_STOPS or surface[-1] in _CJK_STOPS
            ):
                surface = surface.strip(_CJK_STOPS).strip()
            if not surface:
                dropped["empty"] += 1
                continue
            hit = None
            if len(item) > 2 and item[2]:
                context = item[2].strip()
                if context and context != surface:
                    hit = self._locate_hinted(surface, context, cursor, lo, hi, taken, occupied, allow_overlap)
                    self.hinted += hit is not None
            if hit is None:
                hit = self._locate(surface, cursor, lo, hi, taken, occupied, allow_overlap, tiers)
            if hit is None:
                dropped["not_found"] += 1
                continue
            if hit == "repeated":
                dropped["repeated"] += 1
                continue
            start, end, tier = hit
            matched[tier] += 1
            taken.add((start, end))
            occupied[start - lo : end - lo] = b"\x01" * (end - start)
            found.append((Span(start, end, self.text[start:end], label), surface))
            cursor = start
        return found, dropped, matched

    def _hint_candidates(self, surface: str, context: str, cursor: int, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """Occurrences of `surface` inside occurrences of `context` in [lo, hi): after the cursor
        first, then from lo; as they are, else (the context found nowhere) in the folded view."""
        inner = _inner(context, surface)
        found_context = False
        if inner:
            find, size, width = self.text.find, len(surface), len(context)
            # pass 1: mentions starting at or after the cursor; pass 2: those before it
            for begin, stop, after in ((max(lo, cursor - width + 1), hi, True), (lo, min(hi, cursor + width - 1), False)):
                i = find(context, begin, stop)
                while i != -1:
                    found_context = True
                    for j in inner:
                        start = i + j
                        if (start >= cursor) == after and self.bounded(start, start + size):
                            yield start, start + size
                    i = find(context, i + 1, stop)
        if found_context:
            return
        needle, haystack = normalise(surface), normalise(context)
        inner = _inner(haystack, needle) if needle else []
        if not inner:
            return
        view = self.view()
        spans = []
        i = view.text.find(haystack)
        while i != -1:
            for j in inner:
                span = view.to_original(i + j, i + j + len(needle))
                if span is not None and lo <= span[0] and span[1] <= hi and self.bounded(*span):
                    spans.append(span)
            i = view.text.find(haystack, i + 1)
        yield from (span for span in spans if span[0] >= cursor)
        yield from (span for span in spans if span[0] < cursor)

    def _locate_hinted(self, surface, context, cursor, lo, hi, taken, occupied, allow_overlap):
        """The first free mention the hint points at, with the tier its characters match by; None to
        fall back to the plain walk."""
        for start, end in self._hint_candidates(surface, context, cursor, lo, hi):
            if (start, end) in taken:
                continue
            if allow_overlap or occupied.find(1, start - lo, end - lo) == -1:
                found = self.text[start:end]
                tier = "exact" if found == surface else "case" if found.lower() == surface.lower() else "normalised"
                return start, end, tier
        return None

    def _candidates(self, tier: str, surface: str, cursor: int, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """Occurrences in [lo, hi): after the cursor first, then from lo (the LLM listed out of order)."""
        if tier != "normalised" and self._plain_scans < _PLAIN_SCANS:
            # a few misses are cheaper to search for than to index the whole text for
            haystack, needle = (self.text, surface) if tier == "exact" else (self._lowered(), surface.lower())
            if haystack is not None:
                self._plain_scans += 1
                find, size = haystack.find, len(needle)
                for begin, stop, last in ((cursor, hi, hi), (lo, min(cursor + size - 1, hi), cursor - 1)):
                    i = find(needle, begin, stop)
                    while i != -1 and i <= last:
                        if self.bounded(i, i + size):
                            yield i, i + size
                        i = find(needle, i + 1, stop)
                return
        starts, spans = self.occurrences(tier, surface)
        for begin, stop in ((cursor, hi), (lo, cursor)):
            for k in range(bisect.bisect_left(starts, begin), bisect.bisect_left(starts, stop)):
                if spans[k][1] <= hi:
                    yield spans[k]

    def _locate(self, surface, cursor, lo, hi, taken, occupied, allow_overlap, tiers):
        # the usual case: the next mention is a little after the previous one, as it is or in
        # another case; found by plain search, without building the whole-text occurrence lists
        stop = min(hi, cursor + _NEAR)
        for tier in tiers:
            if tier == "normalised":
                continue
            haystack, needle = (self.text, surface) if tier == "exact" else (self._lowered(), surface.lower())
            if haystack is None:
                continue
            find, size = haystack.find, len(needle)
            i = find(needle, cursor, stop)
            while i != -1:
                end = i + size
                if (i, end) not in taken and self.bounded(i, end):
                    if allow_overlap or occupied.find(1, i - lo, end - lo) == -1:
                        return i, end, tier
                i = find(needle, i + 1, stop)
        seen_any = False
        for tier in tiers:
            fallback = None
            for start, end in self._candidates(tier, surface, cursor, lo, hi):
                seen_any = True
                if (start, end) in taken:
                    continue
                if allow_overlap or occupied.find(1, start - lo, end - lo) == -1:
                    return start, end, tier
                if fallback is None:
                    fallback = (start, end, tier)
            if fallback is not None:
                return fallback
        return "repeated" if seen_any else None


# ---------------------------------------------------------------- resolving


def resolve(
    aligner: Aligner,
    listed: list[tuple[Span, str]],
    *,
    label_all_mentions: bool,
    allow_overlap: bool = False,
    prefer: Prefer = "longest",
    dropped: Counter | None = None,
) -> tuple[list[Span], int]:
    """Listed spans after the overlap rule, plus the mentions added by `label_all_mentions`."""
    dropped = Counter() if dropped is None else dropped
    text = aligner.text
    occupied = bytearray(len(text))
    chosen: list[Span] = []
    seen: set[tuple[int, int, str]] = set()
    if prefer == "longest":
        ranked = [(span.start - span.end, span.start, k) for k, (span, _) in enumerate(listed)]
        ranked.sort()
        order: Iterable[int] = [k for _, _, k in ranked]
    else:
        order = range(len(listed))
    for k in order:
        span = listed[k][0]
        key = (span.start, span.end, span.label)
        if key in seen:
            dropped["repeated"] += 1
            continue
        if not allow_overlap and occupied.find(1, span.start, span.end) != -1:
            dropped["overlap"] += 1
            continue
        seen.add(key)
        chosen.append(span)
        occupied[span.start : span.end] = b"\x01" * (span.end - span.start)

    added = 0
    if label_all_mentions:
        labels: dict[str, set[str]] = {}
        surfaces: dict[str, set[str]] = {}
        for span, surface in listed:
            folded = aligner.folded(surface)
            labels.setdefault(folded, set()).add(span.label)
            surfaces.setdefault(folded, set()).add(span.text)
        wanted: dict[str, str] = {}
        for folded, names in labels.items():
            if len(names) == 1:  # more than one: the LLM itself told mentions apart, trust only its list
                (label,) = names
                wanted.update(dict.fromkeys(surfaces[folded], label))
        # without overlaps, every occurrence (a free one is added; one holding listed spans may take their place)
        extras = [
            (s - e, s, e, surface, wanted[surface])
            for s, e, surface in aligner.every_occurrence(wanted, None if not allow_overlap else occupied)
            if e - s > 1 or not aligner.undecidable(s, e)
        ]
        extras.sort()  # longest first
        chosen.sort()
        starts = [span.start for span in chosen]
        for _, s, e, surface, label in extras:
            if occupied.find(1, s, e) != -1:
                if allow_overlap:
                    continue
                # The longer name wins: the walk may have put a listed shorter name inside an occurrence of a
                # longer one (中国, listed first, at the 中国 of 中国人民银行 when the bank was listed for a later
                # mention). An occurrence whose marked characters are all listed spans wholly inside it takes
                # their place; one that crosses a span's edge (or is one) is left alone.
                first = bisect.bisect_right(starts, s) - 1 if starts else -1
                first = first if first >= 0 and chosen[first].end > s else first + 1
                last = bisect.bisect_left(starts, e)
                inner = chosen[first:last]
                if not inner or inner[0].start < s or inner[-1].end > e or (inner[0].start, inner[-1].end) == (s, e):
                    continue
                del chosen[first:last], starts[first:last]
                occupied[s:e] = bytes(e - s)
                dropped["overlap"] += len(inner)
            at = bisect.bisect_left(starts, s)
            chosen.insert(at, Span(s, e, surface, label))
            starts.insert(at, s)
            occupied[s:e] = b"\x01" * (e - s)
            added += 1
    chosen.sort()
    return chosen, added


def align(
    text: str,
    entities: Iterable[tuple[str, str] | tuple[str, str, str | None]],
    *,
    label_all_mentions: bool = True,
    allow_overlap: bool = False,
    prefer: Prefer = "longest",
) -> Alignment:
    aligner = Aligner(text)
    listed, dropped, matched = aligner.walk(entities, allow_overlap=allow_overlap)
    spans, added = resolve(
        aligner, listed, label_all_mentions=label_all_mentions, allow_overlap=allow_overlap, prefer=prefer, dropped=dropped
    )
    return Alignment(spans=spans, dropped=dropped, matched=matched, added=added, hinted=aligner.hinted)
