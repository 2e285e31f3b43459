"""Engine and session management; schema migrations applied automatically on first use."""
from __future__ import annotations

import ast
import contextlib
import contextvars
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from ..errors import CatalogError
from ..textsafe import excerpt

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

#: The largest integer SQL takes as a value, a LIMIT or an OFFSET (SQLite's INTEGER, PostgreSQL's BIGINT);
#: Python's ints do not stop there.
SQL_INT_MAX = 2**63 - 1

#: How long a command waits for another process's catalog write lock before giving up (seconds).
DEFAULT_LOCK_TIMEOUT_S = 60.0
#: After this long waiting for the lock, the "waiting for the catalog lock" notice is given.
LOCK_NOTICE_AFTER_S = 2.0
LOCK_TIMEOUT_ENV = "ADAPTERHUB_LOCK_TIMEOUT"
# Inside a retried transaction (api.retry_on_busy), SQLite waits only this slice per attempt so the
# retry loop gets control back to give the notice and to keep the overall bound.
_busy_slice_ms: contextvars.ContextVar[int | None] = contextvars.ContextVar("adapterhub_busy_slice_ms", default=None)

def _migrations_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("adapterhub.migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent.parent / "migrations"


MIGRATIONS_DIR = _migrations_dir()
_upgrade_lock = threading.Lock()


def default_home() -> Path:
    return Path(os.environ.get("ADAPTERHUB_HOME") or Path.home() / ".adapterhub")


def default_sqlite_url(home: Path | None = None) -> str:
    return f"sqlite:///{(home or default_home()) / 'catalog.db'}"


def lock_timeout_setting(value: float | str | None = None) -> float:
    """The lock timeout in seconds: ``value`` if given, else env ADAPTERHUB_LOCK_TIMEOUT, else 60.

    Raises CatalogError (one line) unless it is a finite number > 0.
    """
    source = "lock timeout"
    if value is None:
        value = os.environ.get(LOCK_TIMEOUT_ENV) or None
        source = LOCK_TIMEOUT_ENV
        if value is None:
            return DEFAULT_LOCK_TIMEOUT_S
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise CatalogError(f"{source} must be a number of seconds > 0, not {excerpt(value)!r}") from None
    if not math.isfinite(t) or t <= 0:
        raise CatalogError(f"{source} must be a number of seconds > 0, not {excerpt(value)!r}")
    return t


@contextlib.contextmanager
def busy_slice(ms: int) -> Iterator[None]:
    """Within this block, SQLite connections checked out wait at most ``ms`` for a lock (then raise "locked")."""
    token = _busy_slice_ms.set(max(1, int(ms)))
    try:
        yield
    finally:
        _busy_slice_ms.reset(token)


def _sqlite_pragmas(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry, busy_ms: int = 30000) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: every commit is fsynced (about 0.1 ms here). A deployment event is the commit point of an on-disk
    # patch: once it commits, the patch's WAL is deleted, so a commit a power cut could still lose (NORMAL)
    # would leave patched weights that the catalog does not record.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
    record.info["busy_ms"] = int(busy_ms)


def _sqlite_checkout(full_ms: int) -> Callable[[DBAPIConnection, ConnectionPoolEntry, PoolProxiedConnection], None]:
    """A pool ``checkout`` listener: the busy timeout is the slice inside a retried transaction, else the full one."""
    def on_checkout(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection) -> None:
        want = _busy_slice_ms.get() or full_ms
        if record.info.get("busy_ms") != want:
            dbapi_conn.execute(f"PRAGMA busy_timeout={int(want)}")
            record.info["busy_ms"] = want
    return on_checkout


def describe_url(url: str) -> str:
    """A short, password-free description of a catalog URL (the file path for SQLite)."""
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):] or url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only used in messages
        return "(unparseable URL)"


def make_engine(url: str, *, lock_timeout: float | None = None) -> Engine:
    """Create an engine for ``url``.

    SQLite gets WAL, foreign keys and a busy timeout of ``lock_timeout`` seconds (default: env
    ADAPTERHUB_LOCK_TIMEOUT, else 60 s); PostgreSQL gets the same as its ``lock_timeout``. Raises
    CatalogError for an unusable URL or timeout.
    """
    timeout = lock_timeout_setting(lock_timeout)
    full_ms = int(timeout * 1000)
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": timeout})
            event.listen(engine, "connect", lambda c, r: _sqlite_pragmas(c, r, full_ms))
            event.listen(engine, "checkout", _sqlite_checkout(full_ms))
        else:
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://"):]
            # a row or table lock held by another client is waited for at most the lock timeout (PostgreSQL's
            # own default is forever); the server then cancels the statement with SQLSTATE 55P03
            engine = create_engine(url, pool_pre_ping=True,
                                   connect_args={"options": f"-c lock_timeout={full_ms}"})
    except (ArgumentError, ImportError) as e:
        raise CatalogError(f"cannot use database URL: {e.__class__.__name__}: {str(e).splitlines()[0]}") from None
    return engine


def alembic_config(engine: Engine | None = None, connection: Connection | None = None,
                   blob_reader: Callable[[str], bytes | None] | None = None) -> AlembicConfig:
    """The Alembic configuration for the packaged migrations folder.

    Takes: an engine whose URL the migrations use, and/or an open connection they run on (migrations/env.py
    reuses ``config.attributes["connection"]``). Returns: the ``alembic.config.Config``.
    """
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    if blob_reader is not None:  # data migrations that read blobs (0006: mask hashes)
        cfg.attributes["blob_reader"] = blob_reader
    return cfg


def head_revision() -> str:
    """The single head revision of the packaged migrations.

    Raises: CatalogError when the migrations folder has no head (tests/test_migrations.py keeps it to one).
    """
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()  # raises if several heads
    if head is None:
        raise CatalogError(f"no Alembic revisions in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except DatabaseError as e:  # OperationalError (cannot open, locked) or a corrupt file
        raise CatalogError(_open_error(engine, e)) from None


def _open_error(engine: Engine, e: DatabaseError) -> str:
    first = (str(e.orig if e.orig is not None else e).strip().splitlines() or ["?"])[0]
    where = (engine.url.database or ":memory:") if engine.dialect.name == "sqlite" else \
        describe_url(engine.url.render_as_string(hide_password=True))
    if isinstance(e, OperationalError):
        return f"cannot open the catalog database at {where}: {first}"
    return f"the catalog at {where} is not a readable database ({first})"


def upgrade(engine: Engine, revision: str = "head", *, blob_reader: Callable[[str], bytes | None] | None = None
            ) -> None:
    """Apply Alembic migrations up to ``revision`` (``blob_reader``: digest -> verified blob bytes or None, for
    revisions that recompute values from the blobs)."""
    from alembic import command
    from alembic.util import CommandError

    if not revision.strip():  # Alembic asserts on an empty one
        raise CatalogError("cannot migrate the catalog database: the target revision is empty (e.g. 'head')")
    with _upgrade_lock:
        try:
            with engine.begin() as conn:
                command.upgrade(alembic_config(engine, conn, blob_reader), revision)
        except DatabaseError as e:
            raise CatalogError(f"cannot migrate the catalog database: {_open_error(engine, e)}") from None
        except CommandError as e:  # unknown revision and the like
            raise CatalogError(f"cannot migrate the catalog database: {e}") from None


def downgrade(engine: Engine, revision: str = "base", *, blob_reader: Callable[[str], bytes | None] | None = None
              ) -> None:
    from alembic import command

    with engine.begin() as conn:
        command.downgrade(alembic_config(engine, conn, blob_reader), revision)


_DECLARED_HEAD_LOCK = threading.Lock()
_declared_head_cache: list[str | None] = []


def declared_head() -> str | None:
    """:func:`_read_declared_head`, read once per process under a lock. The migration files ship with the package
    and do not change while it runs; the lock also keeps ``ast.parse`` out of concurrent threads, where CPython
    3.11 can fail with "AST constructor recursion depth mismatch" (its AST-to-object conversion kept one
    recursion counter for all threads)."""
    with _DECLARED_HEAD_LOCK:
        if not _declared_head_cache:
            _declared_head_cache.append(_read_declared_head())
        return _declared_head_cache[0]


def _read_declared_head() -> str | None:
    """The head revision as the packaged migration files declare it, read without importing them or Alembic: each
    file's module-level ``revision`` and ``down_revision`` literals; the head is the one revision no other
    names as its parent. None when a file does not declare them as plain literals or the files do not have
    exactly one head (then Alembic decides: :func:`head_revision`). tests/test_migrations.py checks that it
    agrees with Alembic's own answer."""
    revs: set[str] = set()
    parents: set[str] = set()
    for f in sorted(MIGRATIONS_DIR.joinpath("versions").glob("*.py")):
        if f.name == "__init__.py":
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        except (OSError, SyntaxError, ValueError):
            return None
        found: dict[str, object] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                    and node.targets[0].id in ("revision", "down_revision"):
                try:
                    found[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    return None
        rev, down = found.get("revision"), found.get("down_revision", "?")
        if not isinstance(rev, str) or rev in revs:
            return None
        revs.add(rev)
        downs = (down,) if down is None or isinstance(down, str) else down
        if not isinstance(downs, tuple) or not all(d is None or isinstance(d, str) for d in downs):
            return None
        parents.update(d for d in downs if d is not None)
    heads = revs - parents
    return next(iter(heads)) if len(heads) == 1 and parents <= revs else None


def _stamped(engine: Engine) -> list[str] | None:
    """The catalog's recorded revisions (Alembic's ``alembic_version`` table) through one plain query, or None
    when it cannot be read that way (no table yet, or an error :func:`current_revision` words)."""
    try:
        with engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(text("SELECT version_num FROM alembic_version"))]
    except DatabaseError:
        return None


def ensure_schema(engine: Engine, *, blob_reader: Callable[[str], bytes | None] | None = None) -> None:
    """Upgrade to head unless already there; ``blob_reader`` as :func:`upgrade`.

    The check costs one query: the recorded revision against :func:`declared_head`. Loading Alembic's script
    directory (it imports every migration) took ~0.2 s of every command's start; it now happens only when
    the cheap check cannot say "at head"."""
    head = declared_head()
    if head is not None and _stamped(engine) == [head]:
        return
    if current_revision(engine) != head_revision():
        upgrade(engine, blob_reader=blob_reader)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def table_names(engine: Engine) -> list[str]:
    return sorted(inspect(engine).get_table_names())
