"""CoNLL files: read every common variant, build task texts with exact entity spans, write tags back.

Reading accepts 2 to 4+ columns (space or tab separated; the token is the first column, the tag the
last), IOB1, IOB2, BIOES/BILOU and BMES tags, `-DOCSTART-` lines at the start or the end of documents (or
none: the file is one document), blank-line sentences, CRLF and a missing final newline. Any entity
type name is kept as written (`PER`, `creative-work`, ...).

A malformed file raises `ConllError` with `file:line: what is wrong`, before anything else happens.

Joining tokens into task text (`join`): "space" puts one space between tokens, "none" nothing, and
"auto" (the default) decides per file. A file where fewer than half of the tokens holding letters
are of scripts written without spaces (Chinese, Japanese, Thai, Lao, Khmer, Myanmar) is of a spaced
language: one space, as always (an English file quoting `虎牢之戰` stays as it was). Otherwise, when
nine in ten or more of those tokens are single characters, the file is character-per-line (MSRA,
Resume, Weibo, People's Daily): its tokens join without spaces, digits and Latin letters included
(`1 9 9 7 年` -> `1997年`), except that two whole words of a spaced script keep one (`Bill Gates`).
Else it is word-segmented: one space, except next to a character of an unspaced script or of CJK
punctuation and full-width forms (`東京 に 住む John Smith` -> `東京に住むJohn Smith`).
Hangul counts as spaced: Korean puts spaces between words.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from backend.infra.errors import BackendError
from backend.infra.outputs import write_output
from backend.spans.alignment import Span

DOCSTART = "-DOCSTART-"
OUTSIDE = "O"
# BILOU's L/U are BIOES's E/S under other names, BMES's M is BIOES's I
_PREFIXES = {"B": "B", "I": "I", "E": "E", "S": "S", "L": "E", "U": "S", "M": "I"}
SCHEMES = ("IOB1", "IOB2", "BIOES", "BMES")
JOINS = ("auto", "space", "none")
# scripts written without spaces between words, with CJK punctuation, symbols and full-width forms
# (Hangul is left out: Korean is written with spaces between words)
_UNSPACED = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x2FDF),  # CJK radicals
    (0x3000, 0x303F),  # CJK punctuation: 、。〈〉「」【】
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x31C0, 0x31FF),
    (0x3200, 0x33FF),  # enclosed and compatibility CJK
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF),
    (0xFE10, 0xFE1F),  # vertical forms
    (0xFE30, 0xFE4F),  # CJK compatibility forms
    (0xFF00, 0xFFEF),  # full-width ASCII (，！１Ａ), half-width Katakana
    (0x20000, 0x3FFFF),
)
# of a file's tokens holding a letter of an unspaced script, the share of single characters from
# which it is read as character-per-line (word-segmented Chinese or Japanese has about half of them)
CHARACTER_PER_LINE = 0.9


class ConllError(BackendError):
    """A CoNLL file that cannot be read; the message starts with `file:line:`."""


@dataclass(frozen=True)
class Token:
    text: str
    tag: str  # as written in the file
    line: int  # 1-based, for error messages


@dataclass(frozen=True)
class TokenRun:
    """Tokens [start, end) of one sentence carry one entity of type `label`."""

    start: int
    end: int
    label: str


@dataclass
class Sentence:
    tokens: list[Token]

    @property
    def words(self) -> list[str]:
        return [t.text for t in self.tokens]

    @property
    def tags(self) -> list[str]:
        return [t.tag for t in self.tokens]


@dataclass
class Document:
    sentences: list[Sentence]
    source: str  # file name
    index: int  # 0-based position in the file
    has_docstart: bool = False

    @property
    def labels(self) -> set[str]:
        return {e.label for s in self.sentences for e in decode(s.tags)}


# ---- tags ----
def split_tag(tag: str) -> tuple[str, str | None]:
    """`B-PER` -> ("B", "PER"); `O` -> ("O", None). Raises ValueError on anything else."""
    if tag == OUTSIDE:
        return OUTSIDE, None
    if len(tag) > 2 and tag[1] in "-_" and tag[0] in _PREFIXES:
        return _PREFIXES[tag[0]], tag[2:]
    raise ValueError(f"tag {tag!r} is neither O nor a B-/I-/E-/S-/M-/L-/U- prefix with a type")


def decode(tags: Sequence[str]) -> list[TokenRun]:
    """Entities of one sentence; one reading serves IOB1, IOB2 and BIOES.

    B- and S- always start an entity; I- and E- continue the open entity of the same type, or start
    one (IOB1, or a slightly inconsistent file); E- and S- close it.
    """
    entities: list[TokenRun] = []
    open_start: int | None = None
    open_label: str | None = None

    def close(end: int) -> None:
        nonlocal open_start, open_label
        if open_start is not None and open_label is not None:
            entities.append(TokenRun(open_start, end, open_label))
        open_start, open_label = None, None

    for i, tag in enumerate(tags):
        prefix, label = split_tag(tag)
        if prefix == OUTSIDE:
            close(i)
            continue
        if prefix in "BS" or label != open_label:
            close(i)
            open_start, open_label = i, label
        if prefix in "ES":
            close(i + 1)
    close(len(tags))
    return entities


def encode(length: int, entities: Iterable[TokenRun], scheme: str = "IOB2") -> list[str]:
    """Tags for `length` tokens carrying `entities` (non-overlapping), in IOB1, IOB2, BIOES or BMES."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    tags = [OUTSIDE] * length
    previous_end, previous_label = -1, None
    for entity in sorted(entities, key=lambda e: e.start):
        size = entity.end - entity.start
        if scheme in ("BIOES", "BMES"):
            inside = "M" if scheme == "BMES" else "I"
            if size == 1:
                tags[entity.start] = f"S-{entity.label}"
            else:
                tags[entity.start] = f"B-{entity.label}"
                for i in range(entity.start + 1, entity.end - 1):
                    tags[i] = f"{inside}-{entity.label}"
                tags[entity.end - 1] = f"E-{entity.label}"
        else:
            # IOB1 uses B- only where an entity directly follows one of the same type
            begins = scheme == "IOB2" or (previous_end == entity.start and previous_label == entity.label)
            tags[entity.start] = f"{'B' if begins else 'I'}-{entity.label}"
            for i in range(entity.start + 1, entity.end):
                tags[i] = f"I-{entity.label}"
        previous_end, previous_label = entity.end, entity.label
    return tags


# ---- reading ----
def _lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConllError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConllError(f"{path}:{line}: not UTF-8 text (byte {raw[error.start]:#04x})") from None
    # splitlines() would also split on \x0b, \x1c, U+2028... which can sit inside tokens
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _columns(line: str) -> list[str]:
    return line.split("\t") if "\t" in line else line.split()


def read_conll(path: str | Path) -> list[Document]:
    """Read one CoNLL file into documents of sentences of tokens. Raises ConllError (file:line)."""
    path = Path(path)
    name = path.name
    documents: list[Document] = []
    sentences: list[Sentence] = []
    tokens: list[Token] = []
    width: int | None = None  # column count, fixed by the first token line
    width_line = 0
    saw_docstart = False

    def end_sentence() -> None:
        nonlocal tokens
        if tokens:
            sentences.append(Sentence(tokens))
            tokens = []

    def end_document() -> None:
        nonlocal sentences
        end_sentence()
        if sentences:
            documents.append(Document(sentences, name, len(documents), saw_docstart))
            sentences = []

    for number, line in enumerate(_lines(path), start=1):
        stripped = line.strip()
        if not stripped:
            end_sentence()
            continue
        columns = [c.strip() for c in _columns(stripped)]
        if columns[0] == DOCSTART:
            end_document()
            saw_docstart = True
            continue
        if len(columns) < 2:
            raise ConllError(f"{path}:{number}: one column ({stripped[:40]!r}); expected a token and a tag")
        if width is None:
            width, width_line = len(columns), number
        elif len(columns) != width:
            raise ConllError(
                f"{path}:{number}: {len(columns)} columns, but line {width_line} has {width}"
                " (a token with a space in a space-separated file?)"
            )
        token, tag = columns[0], columns[-1]
        if not token:
            raise ConllError(f"{path}:{number}: empty token")
        try:
            split_tag(tag)
        except ValueError as error:
            raise ConllError(f"{path}:{number}: {error}") from None
        tokens.append(Token(token, tag, number))
    end_document()
    if saw_docstart:
        for document in documents:
            document.has_docstart = True
    if not documents:
        raise ConllError(f"{path}:1: no tokens found")
    return documents


def read_files(paths: Iterable[str | Path]) -> list[Document]:
    """All documents of several files; any malformed file stops the whole read."""
    documents: list[Document] = []
    for path in paths:
        documents.extend(read_conll(path))
    return documents


def labels_of(documents: Iterable[Document]) -> list[str]:
    found: set[str] = set()
    for document in documents:
        found |= document.labels
    return sorted(found)


# ---- tasks ----
@dataclass
class Unit:
    """One task: a document or a sentence, its text, token offsets and gold entities as spans."""

    text: str
    sentences: list[Sentence]
    token_spans: list[list[tuple[int, int]]]  # per sentence, per token: (start, end) in text
    source: str
    document: int
    sentence: int | None  # None for a whole document
    entities: list[Span] = field(default_factory=list)
    has_docstart: bool = False

    @property
    def key(self) -> str:
        """Stable identity of this unit of this file: what re-imports are recognised by."""
        where = f"{self.source}\0{self.document}\0{'' if self.sentence is None else self.sentence}"
        return hashlib.sha256(f"{where}\0{self.text}".encode()).hexdigest()[:32]

    @property
    def name(self) -> str:
        suffix = "" if self.sentence is None else f".s{self.sentence}"
        return f"{self.source}#d{self.document}{suffix}"


def _unspaced(ch: str) -> bool:
    o = ord(ch)
    return o >= 0x0E00 and any(a <= o <= b for a, b in _UNSPACED)


def _one_character(token: str) -> bool:
    """One character with its combining marks (a Thai consonant and its vowel signs count as one)."""
    return sum(1 for ch in token if unicodedata.category(ch)[0] != "M") == 1


def join_mode(tokens: Iterable[str], join: str = "auto") -> str:
    """How to join these tokens (one file's): "space", "none", "characters" (a character-per-line
    file) or "mixed" (a space unless an unspaced script touches it); see the module's docstring."""
    if join not in JOINS:
        raise ValueError(f"join must be one of {', '.join(JOINS)}, not {join!r}")
    if join != "auto":
        return join
    words = unspaced = single = 0
    for token in tokens:
        if token.isascii():  # the usual token of a spaced language: no need to look at its characters
            words += any(ch.isalpha() for ch in token)
            continue
        if any(_unspaced(ch) and ch.isalpha() for ch in token):
            unspaced += 1
            single += _one_character(token)
        elif any(ch.isalpha() for ch in token):
            words += 1
    if unspaced * 2 <= words + unspaced or not unspaced:
        return "space"
    return "characters" if single >= CHARACTER_PER_LINE * unspaced else "mixed"


def separator(left: str, right: str, mode: str) -> str:
    """What goes between two consecutive tokens of a sentence under a join mode."""
    if mode == "space":
        return " "
    if mode == "none" or _unspaced(left[-1]) or _unspaced(right[0]):
        return ""
    if mode == "characters":
        # two whole words of a spaced script on their lines (`Bill` `Gates`) were two words
        return " " if not (_one_character(left) or _one_character(right)) else ""
    return " "


def _unit(document: Document, sentences: list[Sentence], sentence: int | None, mode: str = "space") -> Unit:
    parts: list[str] = []
    offsets: list[list[tuple[int, int]]] = []
    entities: list[Span] = []
    cursor = 0
    for s_index, sent in enumerate(sentences):
        if s_index:
            parts.append("\n")
            cursor += 1
        spans = []
        previous = None
        for token in sent.tokens:
            if previous is not None:
                gap = separator(previous, token.text, mode)
                parts.append(gap)
                cursor += len(gap)
            spans.append((cursor, cursor + len(token.text)))
            parts.append(token.text)
            cursor += len(token.text)
            previous = token.text
        offsets.append(spans)
    text = "".join(parts)
    for sent, spans in zip(sentences, offsets):
        for entity in decode(sent.tags):
            start, end = spans[entity.start][0], spans[entity.end - 1][1]
            entities.append(Span(start, end, text[start:end], entity.label))
    return Unit(text, sentences, offsets, document.source, document.index, sentence, entities, document.has_docstart)


def build_units(documents: Iterable[Document], per: str = "document", join: str = "auto") -> list[Unit]:
    """One unit per document (sentences joined by newlines) or per sentence; tokens joined as `join`
    says (see the module's docstring), decided once per file so that all its tasks read alike."""
    if per not in ("document", "sentence"):
        raise ValueError(f"per must be 'document' or 'sentence', not {per!r}")
    documents = list(documents)
    by_file: dict[str, list[str]] = {}
    for document in documents:
        by_file.setdefault(document.source, []).extend(t.text for s in document.sentences for t in s.tokens)
    modes = {source: join_mode(tokens, join) for source, tokens in by_file.items()}
    units: list[Unit] = []
    for document in documents:
        mode = modes[document.source]
        if per == "document":
            units.append(_unit(document, document.sentences, None, mode))
        else:
            for index, sentence in enumerate(document.sentences):
                units.append(_unit(document, [sentence], index, mode))
    return units


def token_entities(unit: Unit, spans: Iterable[tuple[int, int, str]]) -> list[list[TokenRun]]:
    """Character spans (start, end, label) -> token entities per sentence of the unit.

    A token belongs to a span when their characters overlap, so a span cutting a token
    (`Obama` in `Obama's`) tags the whole token. Where spans would share a token, the first wins.
    """
    result: list[list[TokenRun]] = [[] for _ in unit.sentences]
    taken: list[set[int]] = [set() for _ in unit.sentences]
    for start, end, label in sorted(spans):
        for s_index, offsets in enumerate(unit.token_spans):
            covered = [i for i, (a, b) in enumerate(offsets) if a < end and start < b and i not in taken[s_index]]
            if not covered:
                continue
            # the covered tokens of one span are contiguous unless another span took one in between
            run = [covered[0]]
            for i in covered[1:]:
                if i != run[-1] + 1:
                    break
                run.append(i)
            result[s_index].append(TokenRun(run[0], run[-1] + 1, label))
            taken[s_index].update(run)
    return result


def write_conll(
    path: str | Path,
    units: Sequence[Unit],
    predicted: Sequence[Iterable[tuple[int, int, str]]],
    *,
    scheme: str = "IOB2",
    with_gold: bool = True,
) -> None:
    """Write `token [gold] predicted` per line (gold as read), sentences blank-line separated.

    Documents are introduced by `-DOCSTART- O` lines when the input had them (per-sentence units of
    one document stay together).
    """
    # tokens holding a space (possible in tab-separated input) need tabs to be read back
    sep = "\t" if any(" " in t.text for u in units for s in u.sentences for t in s.tokens) else " "
    lines: list[str] = []
    previous_document: tuple[str, int] | None = None
    for unit, spans in zip(units, predicted, strict=True):
        if unit.has_docstart and (unit.source, unit.document) != previous_document:
            lines.extend([sep.join([DOCSTART, OUTSIDE, OUTSIDE] if with_gold else [DOCSTART, OUTSIDE]), ""])
        previous_document = (unit.source, unit.document)
        for sentence, entities in zip(unit.sentences, token_entities(unit, spans)):
            tags = encode(len(sentence.tokens), entities, scheme)
            for token, tag in zip(sentence.tokens, tags):
                lines.append(sep.join([token.text, token.tag, tag] if with_gold else [token.text, tag]))
            lines.append("")
    write_output(path, "\n".join(lines) + ("\n" if lines else ""))
