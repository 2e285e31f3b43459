"""Click parameter types for the domain values commands take: REFs, names, weights, finite numbers.

Each type checks its value with the library's own parser (:func:`adapterhub.catalog.refs.parse_ref`,
:func:`adapterhub.catalog.names.validate_name`) and reports a bad one with ``self.fail``: a usage
error (exit 2) raised while click parses the command line, before the command body runs and so
before anything imports torch. The parsers are imported inside ``convert``; both modules are
torch-free, and keeping them out of module scope keeps ``adapterhub --help`` light.

Commands declare these parameters ``is_eager=True``: click converts eager parameters first, so a bad
REF or name is refused before a lazily filled choice (``--method``, ``--mask``, ``--head``, whose
registries import torch) is converted.
"""
from __future__ import annotations

import math
from typing import Any

import click


class RefType(click.ParamType[str]):
    """A REF: ``name``, ``name@N``, ``name@tag``, ``name@latest``, ``name@~N`` or ``sha256:<8+ hex>``
    (checked by the library's parser; shell completion lists the catalog's names and tags)."""

    name = "REF"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """Return ``value`` unchanged when it parses as a REF.

        Raises: click.BadParameter (exit 2) with the parser's message otherwise.
        """
        from adapterhub.catalog.refs import parse_ref
        from adapterhub.errors import RefError

        try:
            parse_ref(value)
        except RefError as e:
            self.fail(str(e), param, ctx)
        return str(value)

    def shell_complete(self, ctx: click.Context, param: click.Parameter,
                       incomplete: str) -> list[click.shell_completion.CompletionItem]:
        """Names, ``name@tag``, ``name@latest``/``@~1`` and ``name@N`` from the catalog (see docs/cli.md)."""
        from click.shell_completion import CompletionItem

        return [CompletionItem(r) for r in _complete_refs(ctx, incomplete)]


class TaskType(click.ParamType[str]):
    """A built-in task name, classification or text-to-text (see ``adapterhub tasks``), checked without
    importing torch."""

    name = "TASK"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """Return ``value`` when it names a built-in task.

        Raises: click.BadParameter (exit 2) listing the built-in tasks otherwise.
        """
        from adapterhub.data.tasks import get_task
        from adapterhub.data.text2text import is_text2text_task
        from adapterhub.errors import DataError

        if is_text2text_task(str(value)):
            return str(value)
        try:
            get_task(str(value))
        except DataError as e:
            self.fail(f"{e}; text-to-text tasks: see `adapterhub tasks --text2text`", param, ctx)
        return str(value)

    def shell_complete(self, ctx: click.Context, param: click.Parameter,
                       incomplete: str) -> list[click.shell_completion.CompletionItem]:
        from click.shell_completion import CompletionItem

        from adapterhub.data.tasks import BUILTIN_TASKS
        from adapterhub.data.text2text import TEXT2TEXT_TASKS

        return [CompletionItem(n) for n in sorted([*BUILTIN_TASKS, *TEXT2TEXT_TASKS]) if n.startswith(incomplete)]


class DatasetSpecType(click.ParamType[str]):
    """A dataset spec: ``csv:PATH``, ``tsv:PATH``, ``jsonl:PATH`` or ``hf:ID[:CONFIG]`` (shape only;
    whether the file exists and its columns are right is found out when it is read)."""

    name = "SPEC"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """Return ``value`` when it has a known kind and a non-empty rest.

        Raises: click.BadParameter (exit 2) otherwise.
        """
        kind, sep, rest = str(value).partition(":")
        if not sep or not rest or kind not in ("csv", "tsv", "jsonl", "hf"):
            self.fail(f"dataset spec {str(value)!r} must look like csv:PATH, jsonl:PATH or hf:ID", param, ctx)
        return str(value)


def _complete_refs(ctx: click.Context, incomplete: str) -> list[str]:
    """Catalog REFs starting with ``incomplete`` (torch-free; nothing when there is no catalog yet).

    Shell completion parses the command line without running the root group's callback, so the
    home and catalog URL are read from the root context's parsed ``--home``/``--db`` (or their
    environment variables) here. The catalog is opened without migrating it; any failure completes nothing.
    """
    import os
    from pathlib import Path

    root = ctx.find_root()
    home = root.params.get("home") or os.environ.get("ADAPTERHUB_HOME")
    db_url = root.params.get("db_url") or os.environ.get("ADAPTERHUB_DB_URL")
    try:
        from adapterhub.catalog import db
        from adapterhub.workspace import Workspace

        h = Path(home).expanduser() if home else db.default_home()
        if not db_url and not (h / "catalog.db").exists():
            return []
        with Workspace.open(h, db_url, migrate=False) as ws:
            return ws.ref_candidates(incomplete)
    except Exception:  # noqa: BLE001 - completion must never print a traceback into the shell
        return []


class NameType(click.ParamType[str]):
    """A safe name (adapter, tag, base, deployment): letters, digits, ``_.-``; no path separators or ``..``."""

    name = "NAME"

    def __init__(self, what: str = "name") -> None:
        """``what`` names the value in messages (``"adapter name"``, ``"deployment name"``)."""
        self.what = what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """Return ``value`` when it is a valid name.

        Raises: click.BadParameter (exit 2) with the validator's message otherwise.
        """
        from adapterhub.catalog.names import validate_name
        from adapterhub.errors import NameError_

        try:
            name = validate_name(value, self.what)
        except NameError_ as e:
            self.fail(str(e), param, ctx)
        if self.what == "tag" and (name == "latest" or name.isdigit()):
            self.fail(f"tag {name!r} is reserved: name@{name} already means "
                      f"{'the newest version' if name == 'latest' else 'version ' + name}", param, ctx)
        return name


class WeightsType(click.ParamType[list[float]]):
    """Comma-separated finite floats: ``0.5,1,2``."""

    name = "W1,W2,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[float]:
        """Return the numbers as a list.

        Raises: click.BadParameter (exit 2) for a non-number or a non-finite value.
        """
        if isinstance(value, list):
            return value
        try:
            out = [float(x) for x in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)
        if not out or not all(math.isfinite(x) for x in out):
            self.fail(f"{value!r}: weights must be finite numbers", param, ctx)
        return out


class FiniteFloat(click.ParamType[float]):
    """A finite number (``inf``/``nan`` refused): a value written into served weights."""

    name = "NUMBER"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        """Return ``value`` as a float.

        Raises: click.BadParameter (exit 2) for a non-number, ``inf`` or ``nan``.
        """
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r}: must be a finite number", param, ctx)
        return x


class MetricType(click.ParamType[str]):
    """A metric name as recorded (``test_accuracy``, ``sst2/validation_loss``): printable, no commas."""

    name = "METRIC"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """Return the name. Raises: click.BadParameter (exit 2) for an empty, long or unprintable one."""
        text = str(value).strip()
        if not text or len(text) > 100 or "," in text or not text.isprintable():
            self.fail(f"{str(value)[:60]!r} is not a metric name (e.g. test_accuracy)", param, ctx)
        return text


class MetricListType(click.ParamType[list[str]]):
    """Comma-separated metric names: ``test_accuracy,test_n``."""

    name = "A,B,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[str]:
        """Return the names in order, without repeats. Raises: click.BadParameter (exit 2) for a bad one."""
        if isinstance(value, list):
            return value
        parts = str(value).split(",")
        return list(dict.fromkeys(METRIC.convert(p, param, ctx) for p in parts))


REF = RefType()
METRIC = MetricType()
METRIC_LIST = MetricListType()
ADAPTER_NAME = NameType("adapter name")
BASE_NAME = NameType("base name")
TAG = NameType("tag")
DEPLOYMENT_NAME = NameType("deployment name")

TASK = TaskType()
DATASET = DatasetSpecType()

__all__ = ["ADAPTER_NAME", "BASE_NAME", "DATASET", "DEPLOYMENT_NAME", "METRIC", "METRIC_LIST", "REF", "TAG", "TASK",
           "DatasetSpecType", "FiniteFloat", "MetricListType", "MetricType", "NameType", "RefType", "TaskType",
           "WeightsType"]
