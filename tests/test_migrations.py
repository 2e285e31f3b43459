"""Alembic migrations: upgrade head, downgrade base, and no drift between the ORM models and the migrations."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from adapterhub.catalog import db
from adapterhub.catalog.models import Base

ROOT = Path(__file__).resolve().parent.parent


def _diff(engine) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        mc = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
        return compare_metadata(mc, Base.metadata)


def test_upgrade_downgrade_and_no_drift(catalog_url):
    engine = db.make_engine(catalog_url)
    try:
        assert db.current_revision(engine) is None
        assert len(_diff(engine)) >= len(Base.metadata.tables)  # the comparison does see missing tables
        db.upgrade(engine)
        assert db.current_revision(engine) == db.head_revision()
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        assert _diff(engine) == []
        db.downgrade(engine, "base")
        assert db.current_revision(engine) is None
        assert set(inspect(engine).get_table_names()) - {"alembic_version"} == set()
        db.upgrade(engine)  # and up again
        assert _diff(engine) == []
    finally:
        engine.dispose()


def test_alembic_command_line(tmp_path, catalog_url):
    """The documented by-hand invocation works: alembic -c migrations/alembic.ini -x url=... upgrade head."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "alembic", "-c", str(ROOT / "migrations" / "alembic.ini"),
                               "-x", f"url={catalog_url}", *args], capture_output=True, text=True, cwd=tmp_path,
                              timeout=120)

    up = run("upgrade", "head")
    assert up.returncode == 0, up.stderr
    cur = run("current")
    assert db.head_revision() in cur.stdout, cur.stdout + cur.stderr
    down = run("downgrade", "base")
    assert down.returncode == 0, down.stderr


def test_workspace_migrates_on_first_use(home):
    from adapterhub.workspace import Workspace

    with Workspace.open(home) as ws:
        assert db.current_revision(ws.engine) == db.head_revision()
        assert "adapter_versions" in db.table_names(ws.engine)


def _heads(migrations: Path) -> list[str]:
    return list(ScriptDirectory(str(migrations)).get_heads())


def test_alembic_has_exactly_one_head(tmp_path):
    """One linear chain: two revisions on the same parent (branches merged without a merge revision) would
    make `upgrade head` ambiguous and the catalog's automatic upgrade fail."""
    migrations = ROOT / "migrations"
    versions = sorted(p.name for p in (migrations / "versions").glob("*.py") if p.name != "__init__.py")
    heads = _heads(migrations)
    assert len(heads) == 1, f"Alembic heads {heads}: add a merge revision (alembic merge heads)"
    assert heads == [db.head_revision()]  # the one the catalog upgrades to
    # every revision file is on the chain from that head down to base
    chain = list(ScriptDirectory(str(migrations)).walk_revisions())
    assert len(chain) == len(versions) >= 2
    assert chain[-1].down_revision is None
    # the check can fail: a second child of the base revision (beside the existing one) makes two heads
    copy = tmp_path / "migrations"
    shutil.copytree(migrations, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "versions" / "9999_branch.py").write_text(
        f'revision = "9999"\ndown_revision = "{chain[-1].revision}"\n\n\n'
        "def upgrade() -> None:\n    pass\n\n\ndef downgrade() -> None:\n    pass\n")
    assert len(_heads(copy)) == 2


def test_declared_head_agrees_with_alembic_and_says_none_when_unsure(tmp_path, monkeypatch):
    """The start-up check reads the head from the migration files without Alembic (db.declared_head): it must
    name Alembic's own head, and give up (None: Alembic decides) on two heads or a non-literal revision."""
    assert db.declared_head() == db.head_revision() == _heads(ROOT / "migrations")[0]
    copy = tmp_path / "migrations"
    shutil.copytree(ROOT / "migrations", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(db, "MIGRATIONS_DIR", copy)
    assert db._read_declared_head() == db.head_revision()
    nxt = copy / "versions" / "9998_next.py"
    nxt.write_text(f'revision = "9998"\ndown_revision = "{db.head_revision()}"\n')
    assert db._read_declared_head() == "9998" == _heads(copy)[0]  # a new revision is the new head
    (copy / "versions" / "9999_branch.py").write_text('revision = "9999"\ndown_revision = "9998"[:0] + "0001"\n')
    assert db._read_declared_head() is None  # not a literal
    (copy / "versions" / "9999_branch.py").write_text('revision = "9999"\ndown_revision = "0001"\n')
    assert db._read_declared_head() is None and len(_heads(copy)) == 2  # two heads


def test_declared_head_is_read_once_per_process_even_from_threads(monkeypatch):
    """Workspaces opened from several threads at once read the migration files once, under a lock: CPython 3.11's
    ast.parse is not safe in concurrent threads ("AST constructor recursion depth mismatch")."""
    import threading

    calls: list[int] = []
    real = db._read_declared_head

    def counted() -> str | None:
        calls.append(1)
        return real()

    monkeypatch.setattr(db, "_read_declared_head", counted)
    monkeypatch.setattr(db, "_declared_head_cache", [])
    got: list[str | None] = []
    threads = [threading.Thread(target=lambda: got.append(db.declared_head())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [db.head_revision()] * 8 and calls == [1]


def test_opening_a_catalog_at_head_does_not_load_alembic(home):
    """Every command opens the catalog; at head that is one query, not Alembic's script directory (~0.2 s of
    imports); a catalog behind head is still upgraded (test_workspace_migrates_on_first_use)."""
    from adapterhub.workspace import Workspace

    with Workspace.open(home):
        pass  # created and upgraded to head (Alembic runs here)
    code = ("import sys\nfrom adapterhub.workspace import Workspace\n"
            f"with Workspace.open({str(home)!r}) as ws:\n    ws.list_bases()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_ensure_schema_upgrades_when_behind_and_is_one_query_at_head(catalog_url, monkeypatch):
    """On SQLite and PostgreSQL: an empty catalog and one a revision behind are upgraded; at head nothing of
    Alembic runs (its upgrade and its revision reader are made to fail)."""
    engine = db.make_engine(catalog_url)
    try:
        assert db._stamped(engine) is None  # no version table yet: Alembic decides
        db.ensure_schema(engine)
        assert db.current_revision(engine) == db.head_revision()
        chain = list(ScriptDirectory(str(ROOT / "migrations")).walk_revisions())
        db.downgrade(engine, chain[1].revision)  # one behind head
        assert db._stamped(engine) == [chain[1].revision]
        db.ensure_schema(engine)
        assert db._stamped(engine) == [db.head_revision()] and _diff(engine) == []

        def boom(*a, **k):
            raise AssertionError("Alembic ran at head")

        monkeypatch.setattr(db, "upgrade", boom)
        monkeypatch.setattr(db, "current_revision", boom)
        db.ensure_schema(engine)
    finally:
        engine.dispose()
