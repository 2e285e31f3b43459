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
