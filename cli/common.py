"""Shared CLI plumbing: the Workspace from global options, output helpers, error handling."""
from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import click

from adapterhub.errors import AdapterHubError

if TYPE_CHECKING:  # rich is imported when a bar is drawn, not at start-up
    from rich.progress import Progress

    from adapterhub.workspace import Workspace


class Ctx:
    """Global options carried in click's context object; the Workspace is opened lazily."""

    def __init__(self, home: str | None, db_url: str | None, lock_timeout: float | None = None) -> None:
        self.home = home
        self.db_url = db_url
        self.lock_timeout = lock_timeout
        self._ws: Workspace | None = None

    @property
    def ws(self) -> Workspace:
        """The Workspace of the home/catalog the global options name, opened (and migrated) on first use."""
        if self._ws is None:
            from adapterhub.workspace import Workspace

            self._ws = Workspace.open(self.home, self.db_url, lock_timeout=self.lock_timeout,
                                      on_lock_wait=_lock_wait_notice)
        return self._ws

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None


pass_ctx = click.make_pass_decorator(Ctx)


def _lock_wait_notice(waited_s: float) -> None:
    """The Workspace's ``on_lock_wait`` callback: tell the person why nothing happens (stderr)."""
    echo_err("waiting for the catalog lock (another adapterhub process holds it)...")


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors into one-line ``Error: ...`` messages with exit code 1, no traceback.

    Library errors (AdapterHubError), operating-system errors (disk full, permission denied, read-only
    file system...) and database-driver errors (a corrupt or locked catalog) all become one escaped line.
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AdapterHubError as e:
            raise click.ClickException(library_message(e)) from None
        except OSError as e:
            raise click.ClickException(_one_line(os_error_message(e))) from None
        except Exception as e:  # only database-driver errors are translated; the rest re-raised
            msg = _driver_error_message(e)
            if msg is None:
                raise
            raise click.ClickException(_one_line(msg)) from None
    return wrapper


def library_message(e: AdapterHubError) -> str:
    """A library error as one safe line that names this command's options for the keywords it is about.

    The library speaks in its own terms (``pass drop_extras=True``, "choose another name") and lists the
    keyword arguments at fault in ``e.keywords``; here each one that is an option of the running command
    (or of a parent group, e.g. the root's ``--lock-timeout``) is named by its flag: ``... (option
    --drop-extras)``. Keywords the command has no option for are left out.
    """
    flags = _option_flags(e.keywords)
    hint = "" if not flags else f" (option{'s' if len(flags) > 1 else ''} {', '.join(flags)})"
    return _one_line(str(e) + hint)


def _option_flags(keywords: Sequence[str]) -> list[str]:
    """The long flag (``--lambda``) of each of ``keywords`` that names an option of the current command
    or one of its parent groups, matched by the option's parameter name (``lam``), in ``keywords`` order."""
    ctx = click.get_current_context(silent=True)
    options: dict[str, click.Option] = {}
    while ctx is not None:
        for p in ctx.command.params:
            if isinstance(p, click.Option) and p.name is not None:
                options.setdefault(p.name, p)
        ctx = ctx.parent
    flags = []
    for k in keywords:
        opt = options.get(k)
        if opt is not None:
            flags.append(next((o for o in opt.opts if o.startswith("--")), opt.opts[0]))
    return flags


def _one_line(msg: str) -> str:
    """One line, safe for a terminal: whitespace runs collapsed, control characters and markup made visible."""
    return safe_text(" ".join(str(msg).split())) or "failed"


def os_error_message(e: OSError) -> str:
    """``OSError`` as one sentence: what failed (strerror, errno name) and on which path."""
    import errno as errno_mod
    import os

    hints = {errno_mod.ENOSPC: "the disk is full", errno_mod.EROFS: "the file system is read-only",
             errno_mod.EACCES: "permission denied", errno_mod.EPERM: "operation not permitted"}
    if hasattr(errno_mod, "EDQUOT"):
        hints[errno_mod.EDQUOT] = "the disk quota is exceeded"
    code = e.errno
    what = hints.get(code) if code is not None else None
    text = e.strerror or (os.strerror(code) if code is not None else "") or str(e) or e.__class__.__name__
    name = errno_mod.errorcode.get(code, "") if code is not None else ""
    msg = f"{what} ({text}, {name})" if what else (f"{text} ({name})" if name else text)
    if e.filename is not None:
        msg += f": {os.fsdecode(e.filename) if isinstance(e.filename, bytes) else e.filename}"
        if e.filename2 is not None:
            msg += f" -> {e.filename2}"
    return msg


def _driver_error_message(e: BaseException) -> str | None:
    """A one-sentence message for a SQLAlchemy/driver error, or None when ``e`` is something else."""
    exc = sys.modules.get("sqlalchemy.exc")
    if exc is None or not isinstance(e, exc.SQLAlchemyError):
        return None
    orig = getattr(e, "orig", None)
    first = (str(orig if orig is not None else e).strip().splitlines() or ["?"])[0]
    low = first.lower()
    if "locked" in low or "busy" in low:
        return (f"the catalog database is locked by another process ({first}); try again, or wait longer with "
                "--lock-timeout / ADAPTERHUB_LOCK_TIMEOUT")
    if isinstance(e, exc.DatabaseError) and not isinstance(e, exc.OperationalError):
        return f"the catalog is not a readable database ({first})"
    orm_exc = sys.modules.get("sqlalchemy.orm.exc")
    if orm_exc is not None and isinstance(e, orm_exc.StaleDataError):
        return f"the catalog changed under this command (another process); nothing more was done, run it again ({first})"
    return f"catalog error: {e.__class__.__name__}: {first}"


# C0/C1 controls, DEL, format characters (bidi overrides/isolates, zero-width), line/paragraph separators
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def safe_text(value: Any, *, newlines: bool = False) -> str:
    """``value`` as text that cannot drive a terminal: every control, format (bidi, zero-width), separator,
    surrogate, private-use or unassigned character is replaced by its visible escape (``\\x1b``, ``\\u202e``).

    ``newlines=True`` keeps ``\\n`` (for multi-line text we compose ourselves). Rich markup is *not*
    escaped here: tables take cells as plain ``rich.text.Text``; see :func:`rich_safe` for markup strings.
    """
    import unicodedata

    s = "" if value is None else str(value)
    if s.isprintable() and s.isascii():
        return s
    out = []
    for ch in s:
        if ch == "\n" and newlines:
            out.append(ch)
        elif ch != " " and unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out)


def safe_doc(doc: Any) -> Any:
    """A copy of a JSON-like value with every string (keys too) passed through :func:`safe_text`,
    for text renderers (lineage trees, Mermaid, DOT) that lay catalog strings out line by line."""
    if isinstance(doc, str):
        return safe_text(doc)
    if isinstance(doc, dict):
        return {safe_doc(k) if isinstance(k, str) else k: safe_doc(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return type(doc)(safe_doc(v) for v in doc)
    return doc


def rich_safe(value: Any) -> str:
    """``value`` for a rich *markup* string (status lines, console.print): controls escaped, then markup."""
    from rich.markup import escape

    return escape(safe_text(value))


def echo(msg: Any, *, err: bool = False) -> None:
    """Print a human line (stdout, or stderr with ``err``): control characters made visible, newlines kept."""
    click.echo(safe_text(msg, newlines=True), err=err)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")(fn)


def print_json(doc: Any) -> None:
    """Print exactly one JSON document to stdout."""
    click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
    """A rich table for people (stdout)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Every cell and the title is a plain Text (no markup, no emoji codes), control characters escaped:
    # catalog and Hub strings such as "[/bold]" or "\x1b]8;;..." print literally.
    table = Table(title=None if title is None else Text(safe_text(title)), show_lines=False)
    for c in columns:
        table.add_column(Text(safe_text(c)), overflow="fold")
    for r in rows:
        table.add_row(*[Text(safe_text(v)) for v in r])
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


def progress(description: str = "", *, total: float | None = None, transient: bool = True) -> Progress:
    """A rich progress display on stderr; use it as a context manager and add tasks to it.

    Takes: ``transient`` (remove the bars when done); ``description`` and ``total`` are accepted
    for call-site readability (each command adds its own task). Returns: a rich ``Progress``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    class SafeProgress(Progress):
        """Descriptions and ``info`` fields are shown literally (no markup), control characters escaped."""

        def add_task(self, description: str, *a: Any, **fields: Any) -> TaskID:
            return super().add_task(safe_text(description), *a, **{k: _safe_field(v) for k, v in fields.items()})

        def update(self, task_id: TaskID, *, description: str | None = None,
                   **fields: Any) -> None:
            if description is not None:
                fields["description"] = safe_text(description)
            super().update(task_id, **{k: _safe_field(v) if k not in _PROGRESS_ARGS else v for k, v in fields.items()})

    return SafeProgress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}", markup=False),
                        console=Console(file=sys.stderr), transient=transient)


_PROGRESS_ARGS = frozenset({"total", "completed", "advance", "description", "visible", "refresh"})


def _safe_field(v: Any) -> Any:
    return safe_text(v) if isinstance(v, str) else v


def echo_err(msg: Any) -> None:
    """A human line on stderr (warnings, notes), control characters made visible."""
    echo(msg, err=True)


class ConfigError(click.ClickException):
    """A bad global setting (flag or environment variable): one ``Error: ...`` line, exit 2."""

    exit_code = 2


def parse_lock_timeout(value: str | None) -> float | None:
    """``--lock-timeout`` / ADAPTERHUB_LOCK_TIMEOUT: None (the default) or a finite number of seconds > 0.

    Raises ConfigError (exit 2, one line) for anything else.
    """
    import math

    if value is None or value == "":
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = math.nan
    if not math.isfinite(t) or t <= 0:
        raise ConfigError(f"invalid lock timeout {safe_text(str(value)[:40])!r} (--lock-timeout / "
                          "ADAPTERHUB_LOCK_TIMEOUT): give a number of seconds > 0")
    return t


class LazyChoice(click.Choice[str]):
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
    def choices(self) -> tuple[str, ...]:
        if self._names is None:
            self._names = tuple(self._load())
        return self._names

    @choices.setter
    def choices(self, value: Iterable[str]) -> None:
        self._names = tuple(value)
