"""Shared fixtures: isolated homes, tiny random base models, a throwaway PostgreSQL server."""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from adapterhub.testing.tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
# fixtures defined in helper modules (tests/ is on sys.path): hub_server, and catalog_url (SQLite + PostgreSQL)
pytest_plugins = ["fixtures_hub", "catalog_util"]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Every test gets its own ADAPTERHUB_HOME and HF cache and never reaches the network."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("ADAPTERHUB_HOME", str(home))
    monkeypatch.delenv("ADAPTERHUB_DB_URL", raising=False)
    monkeypatch.delenv("ADAPTERHUB_FAULT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(home / "_hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    # tables as wide as on a plain CI run (no terminal: 120 columns), whatever runs the tests (a terminal, xdist)
    monkeypatch.setenv("COLUMNS", "120")
    yield


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "ahome"


@pytest.fixture
def ws(home):
    from adapterhub.workspace import Workspace

    w = Workspace.open(home)
    yield w
    w.close()


@pytest.fixture
def ws_a(tmp_path):
    """Alice's home with the shipped MiniLM base added (the Hub tests' first party)."""
    from adapterhub.workspace import Workspace

    w = Workspace.open(tmp_path / "alice")
    w.add_base("minilm", "minilm")
    yield w
    w.close()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer random BERT (hidden 32) saved as a Hugging Face folder with model.safetensors."""
    return save_tiny("bert", tmp_path_factory.mktemp("tiny_bert") / "model")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 32) saved as a Hugging Face folder."""
    return save_tiny("llama", tmp_path_factory.mktemp("tiny_llama") / "model")


# -- PostgreSQL -------------------------------------------------------------------------------------

def _no_pg(reason: str):
    """Skip (locally) or fail (in CI, where ADAPTERHUB_REQUIRE_PG=1) when no PostgreSQL can be had."""
    if os.environ.get("ADAPTERHUB_REQUIRE_PG") == "1":
        pytest.fail(f"PostgreSQL required but unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """URL of a PostgreSQL server: ADAPTERHUB_TEST_PG_URL, or a throwaway one we start; else skip."""
    url = os.environ.get("ADAPTERHUB_TEST_PG_URL")
    if url:
        yield url
        return
    script = ROOT / "scripts" / "pg-test-server"
    if not shutil.which("runuser") and os.geteuid() == 0:
        _no_pg("no runuser to start PostgreSQL as the postgres user")
    d = Path("/tmp") / f"adapterhub-pg-{uuid.uuid4().hex[:8]}"
    port = str(56000 + (os.getpid() % 2000))
    try:
        out = subprocess.run([str(script), "start", str(d), port], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        _no_pg(f"cannot start a PostgreSQL server: {e}")
    if out.returncode != 0:
        _no_pg(f"cannot start a PostgreSQL server: {out.stderr.strip() or out.stdout.strip()}")
    try:
        yield out.stdout.strip()
    finally:
        subprocess.run([str(script), "stop", str(d)], capture_output=True, timeout=120)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty PostgreSQL database for one test."""
    from sqlalchemy import create_engine, text

    name = "t_" + uuid.uuid4().hex[:12]
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = pg_server.rsplit("/", 1)[0] + "/" + name
    yield url
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
