"""Entity texts that can only be spans of the task's text: the answer's JSON schema with `text` as an
enum of the text's word n-grams.

An endpoint that constrains decoding to the schema (OpenAI's strict `json_schema`, llama.cpp's
`json_object` with a schema) then cannot write an entity text that is not in the task: no copied
placeholder, no paraphrase, no whole sentence. Small models need it most (they copy the prompt's
format or the sentence); large ones lose nothing, as their entities are spans anyway.

Candidates are runs of up to `max_tokens` tokens (a word, one character of a script written
without spaces, or one punctuation mark) within one line, that neither start nor end with
punctuation, except an abbreviation's final full stop ("U.S.", "Inc."), and hold no punctuation
but the kinds names have (`AT&T`, `Coca-Cola`, `O'Brien`); a sentence's full stop ends them. With
`names`, they begin and end with a word that holds a capital or a digit, not only because it begins a
sentence ("The", "He", "In": see `_POSITION_CAPITALS`). Their spelling is the
text's own (its spacing included). Beyond the endpoint's limits (enum values, their characters)
the n-grams are shortened down to `MIN_TOKENS`; a text that still has too many candidates gets the
plain schema, and `EntitySchema.constrained` says so (the log and `llm-ner doctor` report it).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

# scripts written without spaces (CJK, Thai...): each character is a token of its own
_UNSPACED = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3005-\u3007\u3040-\u30ff\u3100-\u312f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003ffff"
_TOKEN = re.compile(f"[{_UNSPACED}]|[^\\W{_UNSPACED}]+|[^\\w\\s]")
_HAS_UNSPACED = re.compile(f"[{_UNSPACED}]")

# the longest entity, in tokens: "University of California at Los Angeles" (6 words), 星海科技（上海）有限公司 (12)
MAX_TOKENS = 6
MAX_TOKENS_UNSPACED = 12
# below this, n-grams would cut common names ("Bank of America"): the plain schema is better
MIN_TOKENS = 3
# an abbreviation's last full stop belongs to it ("U.S.", "Inc.", "Jr.")
_ABBREVIATION = 3
# the punctuation a name may hold: "U.S.", "AT&T", "Coca-Cola", "O'Brien", "AC/DC", "安东尼奥·古特雷斯",
# "星海科技（上海）有限公司"
_INSIDE = ".&'-\u2019/\u00b7()\uff08\uff09"


@dataclass(frozen=True)
class TextLimits:
    """What one endpoint's constrained decoding takes in an enum (OpenAI: 1,000 enum values in a
    schema, and 15,000 characters over them beyond 250 values)."""

    max_values: int
    max_chars: int


@dataclass(frozen=True)
class EntitySchema:
    """The answer schema for one text, and how it was built (for the log, the metrics and the doctor)."""

    schema: dict[str, Any]
    constrained: bool
    candidates: int = 0  # the enum's size (constrained), or how many there were (too many)
    tokens: int = 0  # the longest candidate, in tokens

    @property
    def known_empty(self) -> bool:
        """Constrained, with no candidate: the one answer is "no entities", known without a call."""
        return self.constrained and not self.candidates

    @property
    def kind(self) -> str:
        return "spans" if self.constrained else "free"


def _tokens(text: str) -> list[tuple[int, int, bool]]:
    """(start, end, is a word) of each token."""
    return [(m.start(), m.end(), m.group()[0].isalnum() or m.group()[0] == "_") for m in _TOKEN.finditer(text)]


# English words that hold a capital at a sentence's start only because of where they stand: the
# closed classes (articles, pronouns, prepositions, conjunctions, determiners) and a few adverbs. Small
# models asked for names with none to copy from an example pick the first capitalised span of the
# text, "The" or "He", as a PER (seen on SmolLM2, docs/benchmarks.md)
_POSITION_CAPITALS = frozenset("""
a an the this that these those each every all both some any no another such either neither
i he she it we you they me him her us them my his its our your their who whom whose what which
in on at by for from of to with without into onto upon over under after before during since until
between among through across about against along around behind beyond near off per via than
and but or nor so yet if as when while where although though because unless whether then there
here also however thus still once not
""".split())


def _named(word: str, initial: bool = False) -> bool:
    """A word a name may begin or end with: it holds a capital or a digit, and not only because it
    begins a sentence (`initial`)."""
    if initial and word.lower() in _POSITION_CAPITALS:
        return False
    return any(c.isupper() or c.isdigit() for c in word)


def _initials(text: str, tokens: list[tuple[int, int, bool]]) -> set[int]:
    """The tokens that begin a sentence: the text's first word, a word after a line break, or after
    a full stop, a question or exclamation mark, a colon (quotes and brackets between)."""
    initial: set[int] = set()
    boundary = True
    for i, (start, _, word) in enumerate(tokens):
        if i and "\n" in text[tokens[i - 1][1] : start]:
            boundary = True
        if word:
            if boundary:
                initial.add(i)
            boundary = False
        elif text[start] in ".!?:;\u3002\uff01\uff1f":
            boundary = True
    return initial


def candidates(text: str, max_tokens: int, names: bool = False) -> list[str]:
    """The text's spans an entity may be, in order of first appearance, each once (`names`: only
    those whose first and last words hold a capital or a digit)."""
    tokens = _tokens(text)
    initial = _initials(text, tokens) if names else set()
    out: dict[str, None] = {}
    for i, (start, _, word) in enumerate(tokens):
        if not word or (names and not _named(text[start : tokens[i][1]], i in initial)):
            continue
        for j in range(i, min(len(tokens), i + max_tokens)):
            t_start, t_end, t_word = tokens[j]
            if j > i and "\n" in text[tokens[j - 1][1] : t_start]:
                break  # entities do not run over a line break
            if not t_word:
                if text[t_start] not in _INSIDE:
                    break  # a comma, a bracket, a quote, CJK punctuation: names do not run over them
                prev_start, prev_end, prev_word = tokens[j - 1]
                if text[t_start] == ".":
                    attached = prev_word and prev_end == t_start
                    # "U.S." and "Inc.": a full stop right after a short word ends the candidate with it
                    if attached and prev_end - prev_start <= _ABBREVIATION:
                        if not names or _named(text[prev_start:prev_end]):
                            out.setdefault(text[start:t_end], None)
                    elif not (attached and t_end < len(text) and not text[t_end].isspace()):
                        break  # a sentence's full stop ("playing. The", "playing . The"): names end there
                continue
            if not names or _named(text[t_start:t_end], j in initial):
                out.setdefault(text[start:t_end], None)
    return list(out)


def longest_tokens(text: str) -> int:
    return MAX_TOKENS_UNSPACED if _HAS_UNSPACED.search(text) else MAX_TOKENS


def fits(values: list[str], limits: TextLimits, reserved: int) -> bool:
    return len(values) + reserved <= limits.max_values and sum(len(v) for v in values) <= limits.max_chars


def constrained_schema(plain: dict[str, Any], text: str, limits: TextLimits | None, names: bool = True) -> EntitySchema:
    """`plain` (an `entities_schema`) with each entity's `text` an enum of the text's spans, when the
    endpoint constrains decoding (`limits` set) and they fit its limits; else `plain` itself. `names`:
    in a text with capital letters, only the spans that begin and end with a word holding a capital
    or a digit."""
    if limits is None:
        return EntitySchema(plain, False)
    item = plain["schema"]["properties"]["entities"]["items"]
    reserved = len(item["properties"]["label"].get("enum", ()))  # the labels' enum counts against the limit
    values: list[str] = []
    size = longest_tokens(text)
    names = names and any(c.isupper() for c in text)
    while size >= MIN_TOKENS:
        values = candidates(text, size, names)
        if fits(values, limits, reserved):
            break
        size -= 1
    else:
        return EntitySchema(plain, False, len(values), size + 1)
    if not values and not names:
        return EntitySchema(plain, False)  # no word at all: nothing to constrain to
    schema = copy.deepcopy(plain)
    if not values:
        # capitals, but none a name could begin with ("Each councillor represents two city wards."): the
        # one answer a name can give is none, where the plain schema let a small model write a sentence
        schema["schema"]["properties"]["entities"]["maxItems"] = 0
        return EntitySchema(schema, True, 0, size)
    schema["schema"]["properties"]["entities"]["items"]["properties"]["text"] = {"type": "string", "enum": values}
    return EntitySchema(schema, True, len(values), size)
