"""Shared CLI plumbing: the Workspace from global options, output helpers, error handling."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import click

from adapterhub.errors import AdapterHubError
from adapterhub.progress import BYTE_PHASES, Progress as PhaseProgress
from adapterhub.textsafe import excerpt, visible

if TYPE_CHECKING:  # rich is imported when a bar is drawn, not at start-up
    from rich.progress import Progress, TaskID

    from adapterhub.workspace import Workspace


class Ctx:
    """Global options carried in click's context object; the Workspace is opened lazily."""

    def __init__(self, home: str | None, db_url: str | None, lock_timeout: float | None = None,
                 store_url: str | None = None) -> None:
        self.home = home
        self.db_url = db_url
        self.lock_timeout = lock_timeout
        self.store_url = store_url
        self._ws: Workspace | None = None

    @property
    def ws(self) -> Workspace:
        """The Workspace of the home/catalog the global options name, opened (and migrated) on first use."""
        if self._ws is None:
            from adapterhub.workspace import Workspace

            self._ws = Workspace.open(self.home, self.db_url, lock_timeout=self.lock_timeout,
                                      on_lock_wait=_lock_wait_notice, store_url=self.store_url)
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
    if "locked" in low or "busy" in low or "lock timeout" in low:
        return (f"the catalog database is locked by another process ({first}); try again, or wait longer with "
                "--lock-timeout / ADAPTERHUB_LOCK_TIMEOUT")
    if isinstance(e, exc.DatabaseError) and not isinstance(e, exc.OperationalError):
        return f"the catalog is not a readable database ({first})"
    orm_exc = sys.modules.get("sqlalchemy.orm.exc")
    if orm_exc is not None and isinstance(e, orm_exc.StaleDataError):
        return f"the catalog changed under this command (another process); nothing more was done, run it again ({first})"
    return f"catalog error: {e.__class__.__name__}: {first}"


def safe_text(value: Any, *, newlines: bool = False) -> str:
    """``value`` as text that cannot drive a terminal: every control, format (bidi, zero-width), separator,
    surrogate, private-use or unassigned character is replaced by its visible escape (``\\x1b``, ``\\u202e``).

    ``newlines=True`` keeps ``\\n`` (for multi-line text we compose ourselves). Rich markup is *not*
    escaped here: tables take cells as plain ``rich.text.Text``; see :func:`rich_safe` for markup strings.
    """
    return visible("" if value is None else str(value), newlines=newlines)


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


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None,
                no_wrap: Iterable[str] = ()) -> None:
    """A rich table for people (stdout). Columns named in ``no_wrap`` (hashes, refs) are never
    broken mid-string: the other columns wrap instead."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Every cell and the title is a plain Text (no markup, no emoji codes), control characters escaped:
    # catalog and Hub strings such as "[/bold]" or "\x1b]8;;..." print literally.
    table = Table(title=None if title is None else Text(safe_text(title)), show_lines=False)
    whole = set(no_wrap)
    for c in columns:
        if c in whole:
            table.add_column(Text(safe_text(c)), no_wrap=True, overflow="ignore")
        else:
            table.add_column(Text(safe_text(c)), overflow="fold")
    for r in rows:
        table.add_row(*[Text(safe_text(v)) for v in r])
    Console(file=sys.stdout, soft_wrap=False, width=max(100, _term_width())).print(table)


def _term_width() -> int:
    import shutil

    return shutil.get_terminal_size((120, 20)).columns


def output(doc: Any, as_json: bool, columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None,
           no_wrap: Iterable[str] = ()) -> None:
    """One function picks the format: JSON document or table (``no_wrap``: see :func:`print_table`)."""
    if as_json:
        print_json(doc)
    else:
        print_table(columns, rows, title, no_wrap)


def progress(description: str = "", *, total: float | None = None, transient: bool = True,
             counts: bool = True) -> Progress | LogProgress:
    """Progress on stderr; use it as a context manager and add tasks to it.

    On a terminal: a rich progress display (``transient`` removes the bars when done; ``counts=False``
    leaves out the ``done/total`` column, for work whose size is unknown). Otherwise (a log file, a
    pipe, CI): a :class:`LogProgress` that prints one plain line every ``ADAPTERHUB_PROGRESS_EVERY``
    (default ``10%``, and at least every ``30s``), whenever the task's ``info`` phase changes, and at
    the end. ``description`` and ``total`` are accepted for call-site readability.
    """
    if not _stderr_is_tty():
        return LogProgress(parse_progress_every(os.environ.get("ADAPTERHUB_PROGRESS_EVERY")), counts=counts)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class SafeProgress(Progress):
        """Descriptions and ``info`` fields are shown literally (no markup), control characters escaped."""

        def add_task(self, description: str, *a: Any, **fields: Any) -> TaskID:
            return super().add_task(safe_text(description), *a, **{k: _safe_field(v) for k, v in fields.items()})

        def update(self, task_id: TaskID, *, description: str | None = None,
                   **fields: Any) -> None:
            if description is not None:
                fields["description"] = safe_text(description)
            super().update(task_id, **{k: _safe_field(v) if k not in _PROGRESS_ARGS else v for k, v in fields.items()})

    class CountsColumn(MofNCompleteColumn):
        """``done/total``, and nothing (never ``0/?``) while the total is not known yet (loading)."""

        def render(self, task: Any) -> Any:
            return Text("") if task.total is None else super().render(task)

    cols: list[Any] = [TextColumn("{task.description}", markup=False), BarColumn()]
    if counts:
        cols.append(CountsColumn())
    cols += [TimeElapsedColumn(), TextColumn("{task.fields[info]}", markup=False)]
    return SafeProgress(*cols, console=Console(file=sys.stderr), transient=transient)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


@dataclass(frozen=True)
class ProgressEvery:
    """How often :class:`LogProgress` prints: every ``percent`` of the total, every ``steps`` steps,
    every ``seconds`` (whichever comes first; None = not by that measure)."""

    percent: float | None = 10.0
    steps: int | None = None
    seconds: float | None = 30.0


def parse_progress_every(value: str | None) -> ProgressEvery:
    """``ADAPTERHUB_PROGRESS_EVERY``: comma-separated ``N%``, ``Ns`` and/or ``N`` (steps), e.g. ``5%,60s``.

    Unset or empty: every 10% and at least every 30 s. Raises ConfigError (exit 2) on anything else.
    """
    if value is None or not value.strip():
        return ProgressEvery()
    percent: float | None = None
    steps: int | None = None
    seconds: float | None = None
    try:
        for part in (p.strip() for p in value.split(",")):
            if part.endswith("%"):
                percent = float(part[:-1])
                ok = 0 < percent <= 100
            elif part.endswith("s"):
                seconds = float(part[:-1])
                ok = 0 < seconds < 1e9
            else:
                steps = int(part)
                ok = steps >= 1
            if not ok:
                raise ValueError(part)
    except ValueError:
        raise ConfigError(f"invalid ADAPTERHUB_PROGRESS_EVERY {safe_text(excerpt(value))!r}: use N% (of the total), "
                          "Ns (seconds) or N (steps), comma-separated, e.g. 10%,30s") from None
    return ProgressEvery(percent, steps, seconds)


def progress_after_s(default: float = 1.0) -> float:
    """``ADAPTERHUB_PROGRESS_AFTER``: how long (seconds) a command run through :func:`phase_progress` runs before its
    progress is shown (unset or empty: ``default``). Raises ConfigError (exit 2) on anything but a number from 0 to 3600."""
    value = os.environ.get("ADAPTERHUB_PROGRESS_AFTER")
    if value is None or not value.strip():
        return default
    try:
        after = float(value)
        if not 0 <= after <= 3600:
            raise ValueError(value)
    except ValueError:
        raise ConfigError(f"invalid ADAPTERHUB_PROGRESS_AFTER {safe_text(excerpt(value))!r}: use a number of seconds "
                          "from 0 to 3600") from None
    return after


def _phase_info(phase: str, done: int, total: int) -> str:
    """The text beside the bar: GB for the byte phases (:data:`adapterhub.progress.BYTE_PHASES`), tensors for the
    others; ``[phase]`` last (the log form prints a line whenever it changes)."""
    if phase in BYTE_PHASES and total:
        return f"{done / 1e9:.2f}/{total / 1e9:.2f} GB [{phase}]"
    if total:
        return f"{done}/{total} tensors [{phase}]"
    return f"[{phase}]"


@contextlib.contextmanager
def phase_progress(quiet: bool, label: str) -> Iterator[PhaseProgress | None]:
    """Progress of a library call that reports ``(phase, done, total)`` (:mod:`adapterhub.progress`: the
    deployment commands, ``base add``, ``export``, ``diff``), on stderr as ``label`` (a bar on a terminal, plain
    lines in a log), shown from the first report once the command has run ``ADAPTERHUB_PROGRESS_AFTER`` seconds
    (default 1: a 135M apply is over before and prints nothing; at 8B a create copies and hashes for half a
    minute). ``quiet`` (``--json``): none."""
    after = progress_after_s()
    if quiet:
        yield None
        return
    start = time.monotonic()
    shown: dict[str, Any] = {}
    stack = contextlib.ExitStack()

    def report(phase: str, done: int, total: int) -> None:
        # called mid-operation (inside a deployment's transaction): a display that fails (stderr closed, a pipe
        # gone) stops showing and never fails the operation
        if shown.get("broken") or (not shown and time.monotonic() - start < after):
            return
        info = _phase_info(phase, done, total)
        try:
            if not shown:
                prog: Any = stack.enter_context(progress(counts=False))
                shown.update(prog=prog, task=prog.add_task(label, total=total or None, completed=done, info=info))
                return
            shown["prog"].update(shown["task"], total=total or None, completed=done, info=info)
        except (OSError, ValueError):  # ValueError: a write to a closed file
            shown["broken"] = True

    try:
        yield report
    finally:
        with contextlib.suppress(OSError, ValueError):
            stack.close()


class LogProgress:
    """The stand-in for rich's ``Progress`` when stderr is not a terminal: plain lines a log keeps.

    ``description  step/total (pct%)  info  elapsed`` once per :class:`ProgressEvery` period, on
    every change of the task's phase (the ``[...]`` at the end of ``info``), and when the task ends.
    Implements the part of rich's ``Progress`` the commands use (``add_task``, ``update``, context manager).
    """

    def __init__(self, every: ProgressEvery, *, counts: bool = True,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.every, self.counts = every, counts
        self._clock = clock or time.monotonic
        self._tasks: dict[TaskID, dict[str, Any]] = {}

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for tid, t in self._tasks.items():
            if exc[0] is None and t["completed"] and t["completed"] != t["printed_at"]:
                self._print(tid)

    def add_task(self, description: str, *, total: float | None = None, completed: float = 0,
                 **fields: Any) -> TaskID:
        tid = cast("TaskID", len(self._tasks))
        now = self._clock()
        self._tasks[tid] = {"description": description, "total": total, "completed": completed,
                            "info": fields.get("info", ""), "start": now, "last": now, "printed_at": None,
                            "phase": _phase_of(str(fields.get("info", "")))}
        self._print(tid)  # the start: a long model load is not silence
        t = self._tasks[tid]
        t["printed_at"] = None
        return tid

    def update(self, task_id: TaskID, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields: Any) -> None:
        t = self._tasks[task_id]
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["completed"] = completed
        if advance is not None:
            t["completed"] += advance
        if description is not None:
            t["description"] = description
        if "info" in fields:
            t["info"] = fields["info"]
        phase = _phase_of(str(t["info"]))
        if self._due(t) or (phase is not None and phase != t["phase"]):
            t["phase"] = phase
            self._print(task_id)

    def _due(self, t: dict[str, Any]) -> bool:
        e, done, total = self.every, t["completed"], t["total"]
        prev = t["printed_at"] or 0
        if total and done >= total:
            return True
        if e.seconds is not None and self._clock() - t["last"] >= e.seconds:
            return True
        if e.steps is not None and done - prev >= e.steps:
            return True
        if e.percent is not None and total:
            return int(done * 100 / total / e.percent) > int(prev * 100 / total / e.percent)
        return False

    def _print(self, task_id: TaskID) -> None:
        t = self._tasks[task_id]
        now = self._clock()
        t["last"], t["printed_at"] = now, t["completed"]
        parts = [str(t["description"])]
        if self.counts:
            done, total = t["completed"], t["total"]
            if total:
                parts.append(f"{done:g}/{total:g} ({done * 100 / total:.0f}%)")
            elif done:
                parts.append(f"{done:g}")
        if t["info"]:
            parts.append(str(t["info"]))
        parts.append(f"{now - t['start']:.0f}s")
        echo_err("  ".join(parts))


def _phase_of(info: str) -> str | None:
    """The ``[phase]`` at the end of a progress ``info`` string, if any."""
    if info.endswith("]") and "[" in info:
        return info[info.rindex("[") + 1:-1]
    return None


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
        raise ConfigError(f"invalid lock timeout {safe_text(excerpt(value))!r} (--lock-timeout / "
                          "ADAPTERHUB_LOCK_TIMEOUT): give a number of seconds > 0")
    return t


def check_known(c: Ctx, refs: Sequence[str] = (), *, deployment: str | None = None) -> None:
    """Report an unknown deployment or REF before a command imports the code that computes with tensors (and torch,
    about a second): the same one-line errors the operation gives, from the torch-free catalog reads."""
    if deployment is not None:
        from adapterhub.apply.deploy_ownership import get

        get(c.ws, deployment)
    for ref in refs:
        c.ws.resolve(ref)


def check_one_of(*names: str, exactly: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Refuse, while parsing, a command line with more than one (or, ``exactly``, none) of the options
    ``names`` (parameter names): a usage error (exit 2) before any lazily filled choice is converted.

    A hidden eager option that is never given: click processes it after the eager options given on the
    command line and, among those not given, in declaration order, so put this decorator *below* every
    eager option it checks. Those options must be declared ``is_eager=True``.
    """
    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if ctx.resilient_parsing:
            return value
        given = [n for n in names if ctx.params.get(n) is not None]
        if len(given) > 1 or (exactly and not given):
            flags = " or ".join("--" + n.replace("_", "-") for n in names)
            raise click.UsageError(f"give {'exactly' if exactly else 'at most'} one of {flags}", ctx)
        return value

    return click.option("--check-" + "-".join(n.replace("_", "-") for n in names), hidden=True, is_eager=True,
                        expose_value=False, callback=check)


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
