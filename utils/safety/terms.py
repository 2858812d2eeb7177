"""The explicit-term list: refuses prompts asking for sexual images of the person whose face is used.

The list is data (``safety/terms.json``; TWIN_SAFETY_TERMS_FILE), read once at start-up: a broken file
stops start-up with the file and the line (``load_terms``). Operators extend it by editing the file.

Matching is per whole word, so "Essex", "cocktail", "analysis" and "therapist" pass. Before matching,
text is normalised the way people dodge filters: case folded, accents stripped (NFKD, which also turns
full-width letters into ASCII), Cyrillic / Greek look-alike letters mapped to Latin, invisible format
characters (zero-width space, soft hyphen) removed, leet spellings inside words undone (p0rn, s3x, $ex),
and runs of single letters joined (n u d e, n.u.d.e). A term ending in ``*`` matches any word that starts
with its stem (porn* → pornographic).

``TermList.check(fields)`` looks at each named text (prompt, persona traits, style text) and returns the
first ``TermMatch`` or None; ``TermMatch.error()`` is the 400 ``prompt_refused`` naming the term. The
negative prompt is never checked: "nsfw, nude" there is how users keep such content out.
"""
from __future__ import annotations

import json
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from utils.errors import ConfigError, PromptRefused

#: Fields never checked, whatever the caller passes (see the module docstring).
NEVER_CHECKED = frozenset({"negative_prompt"})
TERM_RE = re.compile(r"^(?:[a-z]+ )*(?:[a-z]+|[a-z]{4,}\*)$")
MAX_TERMS = 2000

# Look-alike letters people substitute for Latin ones (Cyrillic, Greek), mapped by how they look in
# their own case (Greek capital nu looks like N, small nu like v) before case folding.
_CONFUSABLES = str.maketrans({
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
    "У": "Y", "Х": "X", "І": "I", "Ј": "J", "Ѕ": "S", "а": "a", "е": "e", "о": "o", "р": "p", "с": "c",
    "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X", "α": "a", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x",
})
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a",
                       "$": "s", "!": "i", "|": "i"})
_TOKEN_RE = re.compile(r"[a-z0-9@$!|]+")


def normalise(text: str) -> list[str]:
    """The words of ``text`` as the matcher sees them (see the module docstring)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if unicodedata.category(c) not in ("Mn", "Cf"))
    text = text.translate(_CONFUSABLES).casefold()
    words = []
    for raw in _TOKEN_RE.findall(text):
        word = raw.strip("!|")
        if not re.search(r"[a-z]", word):
            continue                      # numbers and stray symbols carry no term
        words.append(word.translate(_LEET))
    return words


def _joined_runs(words: list[str]) -> Iterable[str]:
    """Runs of three or more single letters ("n u d e"), joined."""
    run: list[str] = []
    for w in words + [""]:
        if len(w) == 1:
            run.append(w)
            continue
        if len(run) >= 3:
            yield "".join(run)
        run = []


@dataclass(frozen=True)
class Term:
    text: str                 # as written in the file, e.g. "porn*" or "blow job"
    group: str

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self.text.rstrip("*").split(" "))

    @property
    def prefix(self) -> bool:
        return self.text.endswith("*")

    def matches(self, words: list[str]) -> bool:
        mine, n = self.words, len(self.words)
        for i in range(len(words) - n + 1):
            head, last = words[i:i + n - 1], words[i + n - 1]
            if tuple(head) == mine[:-1] and (last.startswith(mine[-1]) if self.prefix else last == mine[-1]):
                return True
        return False

    def in_run(self, run: str) -> bool:
        # Joined single letters have lost their word breaks: look for the term anywhere in the run.
        return "".join(self.words) in run


@dataclass(frozen=True)
class TermMatch:
    field: str
    term: str
    group: str

    def error(self) -> PromptRefused:
        return PromptRefused(
            f"{self.field} contains {self.term.rstrip('*')!r} ({self.group}), which is refused when a face identity "
            "is used: this service does not make sexual images of real people. Words you want kept out of the "
            "picture belong in negative_prompt, which is never refused",
            details={"field": self.field, "term": self.term.rstrip("*"), "group": self.group})


@dataclass(frozen=True)
class TermList:
    terms: tuple[Term, ...]
    source: str

    def __len__(self) -> int:
        return len(self.terms)

    def match(self, text: str) -> Term | None:
        words = normalise(text)
        runs = list(_joined_runs(words))
        for term in self.terms:
            if term.matches(words) or any(term.in_run(r) for r in runs):
                return term
        return None

    def check(self, fields: Mapping[str, Any]) -> TermMatch | None:
        """The first refused term in ``fields`` ({name: text, or a list / mapping of texts}), or None.
        Fields named in NEVER_CHECKED are skipped."""
        for name, value in fields.items():
            if name in NEVER_CHECKED:
                continue
            for label, text in _texts(name, value):
                term = self.match(text)
                if term is not None:
                    return TermMatch(label, term.text, term.group)
        return None


def _texts(name: str, value: Any) -> Iterable[tuple[str, str]]:
    if value is None:
        return
    if isinstance(value, str):
        yield name, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _texts(f"{name}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _texts(f"{name}[{i}]", v)
    else:
        yield name, str(value)


# --------------------------------------------------------------------------------------------------
# The file
def parse_terms(text: str, source: str) -> TermList:
    """The list in ``text`` (JSON), or ConfigError naming ``source`` and the line."""
    def fail(msg: str, needle: str | None = None, nth: int = 1) -> ConfigError:
        line = _line_of(text, needle, nth) if needle is not None else None
        return ConfigError(f"safety term list {source}{f', line {line}' if line else ''}: {msg}")

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"safety term list {source}, line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("terms"), dict):
        raise fail('the top level must be an object with "version": 1 and a "terms" object of groups')
    terms: list[Term] = []
    seen: dict[str, str] = {}
    for group, entries in data["terms"].items():
        if not isinstance(entries, list) or not entries:
            raise fail(f"group {group!r} must be a non-empty list of terms", json.dumps(group))
        for entry in entries:
            if not isinstance(entry, str):
                raise fail(f"group {group!r}: {entry!r} is not a string", json.dumps(group))
            needle = json.dumps(entry)
            if not TERM_RE.match(entry):
                raise fail(f"term {entry!r} is not lower-case a-z words separated by single spaces (a trailing * "
                           "needs a stem of at least 4 letters)", needle)
            if entry in seen:
                raise fail(f"term {entry!r} appears twice (also in group {seen[entry]!r})", needle, nth=2)
            seen[entry] = group
            terms.append(Term(entry, group))
    if not terms:
        raise fail("no terms defined")
    if len(terms) > MAX_TERMS:
        raise fail(f"{len(terms)} terms; at most {MAX_TERMS}")
    return TermList(tuple(terms), source)


def _line_of(text: str, needle: str, nth: int = 1) -> int | None:
    at = -1
    for _ in range(nth):
        at = text.find(needle, at + 1)
        if at < 0:
            return None
    return text.count("\n", 0, at) + 1


_cache: dict[str, TermList] = {}
_cache_lock = threading.Lock()


def load_terms(path: Path) -> TermList:
    """The list at ``path``, read once per process (start-up reads it first, so a broken file stops it)."""
    key = str(Path(path).resolve())
    with _cache_lock:
        if key not in _cache:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"safety term list {path}: cannot be read: {e}") from None
            _cache[key] = parse_terms(text, str(path))
        return _cache[key]
