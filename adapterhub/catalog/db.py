"""Engine and session management; schema migrations applied automatically on first use."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import CatalogError

def _migrations_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("adapterhub_migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent.parent / "migrations"


MIGRATIONS_DIR = _migrations_dir()
_upgrade_lock = threading.Lock()


def default_home() -> Path:
    return Path(os.environ.get("ADAPTERHUB_HOME") or Path.home() / ".adapterhub")


def default_sqlite_url(home: Path | None = None) -> str:
    return f"sqlite:///{(home or default_home()) / 'catalog.db'}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    """Create an engine for ``url`` (SQLite gets WAL, foreign keys and a 30 s busy timeout)."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://"):]
            engine = create_engine(url, pool_pre_ping=True)
    except (ArgumentError, ImportError) as e:
        raise CatalogError(f"cannot use database URL: {e.__class__.__name__}: {str(e).splitlines()[0]}") from None
    return engine


def alembic_config(engine: Engine | None = None, connection=None):
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as e:
        raise CatalogError(f"cannot open the catalog database: {str(e.orig).splitlines()[0]}") from None


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply Alembic migrations up to ``revision``."""
    from alembic import command

    from alembic.util import CommandError

    with _upgrade_lock:
        try:
            with engine.begin() as conn:
                command.upgrade(alembic_config(engine, conn), revision)
        except OperationalError as e:
            raise CatalogError(f"cannot migrate the catalog database: {str(e.orig).splitlines()[0]}") from None
        except CommandError as e:  # unknown revision and the like
            raise CatalogError(f"cannot migrate the catalog database: {e}") from None


def downgrade(engine: Engine, revision: str = "base") -> None:
    from alembic import command

    with engine.begin() as conn:
        command.downgrade(alembic_config(engine, conn), revision)


def ensure_schema(engine: Engine) -> None:
    """Upgrade to head unless already there (cheap check first)."""
    if current_revision(engine) != head_revision():
        upgrade(engine)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def table_names(engine: Engine) -> list[str]:
    return sorted(inspect(engine).get_table_names())
