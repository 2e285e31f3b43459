"""Shared CLI plumbing: the Workspace from global options, output helpers, error handling."""
from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, Iterable, Sequence

import click

from adapterhub.errors import AdapterHubError


class Ctx:
    """Global options carried in click's context object; the Workspace is opened lazily."""

    def __init__(self, home: str | None, db_url: str | None) -> None:
        self.home = home
        self.db_url = db_url
        self._ws = None

    @property
    def ws(self):
        if self._ws is None:
            from adapterhub.api import Workspace

            self._ws = Workspace.open(self.home, self.db_url)
        return self._ws

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None


pass_ctx = click.make_pass_decorator(Ctx)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one-line ``Error: ...`` messages with exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AdapterHubError as e:
            raise click.ClickException(_one_line(str(e))) from None
    return wrapper


def _one_line(msg: str) -> str:
    return " ".join(msg.split()) or "failed"


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")(fn)


def print_json(doc: Any) -> None:
    """Print exactly one JSON document to stdout."""
    click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
    """A rich table for people (stdout)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r])
    Console(file=sys.stdout, soft_wrap=False, width=max(100, _term_width())).print(table)


def _term_width() -> int:
    import shutil

    return shutil.get_terminal_size((120, 20)).columns


def output(doc: Any, as_json: bool, columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
    """One function picks the format: JSON document or table."""
    if as_json:
        print_json(doc)
    else:
        print_table(columns, rows, title)


def progress(description: str = "", *, total: float | None = None, transient: bool = True):
    """A rich progress bar on stderr (context manager returning (progress, task_id))."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), console=Console(file=sys.stderr), transient=transient,
                    disable=not sys.stderr.isatty() and False)


def echo_err(msg: str) -> None:
    click.echo(msg, err=True)


class LazyChoice(click.Choice):
    """A ``click.Choice`` whose choices come from a registry read on first use.

    The merge-method and mask-method registries live in modules that import torch; reading them
    only when a command that takes the option is parsed (or its help shown) keeps catalog
    commands (``list``, ``show``, ``tag``...) from paying torch's import time at start-up.
    """

    def __init__(self, names: Callable[[], Iterable[str]], case_sensitive: bool = True) -> None:
        self._load = names
        self._names: tuple[str, ...] | None = None
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._names is None:
            self._names = tuple(self._load())
        return self._names

    @choices.setter
    def choices(self, value: Iterable[str]) -> None:
        self._names = tuple(value)
