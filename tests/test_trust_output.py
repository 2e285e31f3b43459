"""Trust boundary: what the CLI prints for people, and how it fails.

* Catalog and Hub strings (tasks, card fields, metric keys, Hub repo/commit/tag, lineage params, forget
  specs) are printed literally: rich markup such as ``[/bold]`` is not interpreted (it used to end every
  ``list`` in a ``MarkupError`` traceback) and terminal control characters (ESC/OSC sequences, CR, C1
  controls, bidi overrides) are shown as visible escapes. ``--json`` keeps the exact strings.
* Errors are one line: a corrupt catalog file, a full disk, a stale row in a tag race, a bad
  ``--db``/``--home``/``--lock-timeout``, and a catalog lock held by another process (with a
  "waiting for the catalog lock" note after ~2 s and a bounded wait).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from catalog_util import make_adapter
from trust_util import assert_no_traceback, assert_one_line_failure, run_cli, tree_snapshot

# a task may not hold \0 \n \r and is at most 100 characters; everything else goes
TASK = "[/bold][red]x[/red][link=http://evil]x[/link]\x1b]8;;http://e\x07\x1b[2J\u202e\x9b\x7f"
HOSTILE = ("[/bold] [red]x[/red] [link=http://evil]x[/link] \x1b]8;;http://evil\x07click\x1b]8;;\x07 "
           "\x1b[2J \rfake \u202eevil \x9b31m \x7f \u2066iso\u2069 \x00nul")
#: What the catalog's JSON documents (metrics, training config) may hold: everything above but NUL, which they
#: refuse (PostgreSQL's JSONB cannot store it; tests/test_trust_more.py proves the refusal).
STORED = HOSTILE.replace(" \x00nul", "")
WIDE = {"COLUMNS": "2000"}  # no folding of table cells, so escaped strings appear in one piece


def assert_terminal_safe(text: str) -> None:
    """No C0 control but newline/tab, no DEL or C1 control, no bidi override/isolate or line separator."""
    bad = [c for c in text if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F
           or 0x202A <= ord(c) <= 0x202E or 0x2066 <= ord(c) <= 0x2069 or c in "\u2028\u2029\u200e\u200f"]
    assert not bad, f"raw control characters in output: {sorted({hex(ord(c)) for c in bad})}"


def assert_literal(out: str) -> None:
    """The markup shows up as typed and the controls as visible escapes."""
    assert "[/bold]" in out and "[red]x[/red]" in out and "[link=http://evil]x[/link]" in out
    assert "\\x1b]8;;http://e" in out and "\\x1b[2J" in out and "\\u202e" in out and "\\x9b" in out


@pytest.fixture
def hostile_home(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    """A home holding one adapter whose task, card, metrics, Hub fields and lineage params are hostile."""
    from adapterhub.catalog.records import Parent
    from adapterhub.workspace import Workspace

    home = tmp_path / "home"
    with Workspace.open(home) as ws:
        ws.add_base("tiny", str(tiny_bert_dir))
        v = ws.register(make_adapter(card={"mask": {"method": HOSTILE}}), name="evil", task=TASK, base="tiny",
                        metrics={STORED: 1.0, "note": STORED},
                        training_config={"forget": {"spec": STORED}},
                        parents=[Parent(None, "imported_from", params={"format": HOSTILE, "path": HOSTILE})])
        ws.register(make_adapter(seed=1), name="evil", task=TASK, base="tiny")
        ws.tag(v.ref, "prod")
        ws.set_hub(v.ref, repo=HOSTILE, commit=HOSTILE, tag=HOSTILE, endpoint=HOSTILE)
    return home


def test_catalog_strings_print_literally_and_json_keeps_them(hostile_home: Path, monkeypatch) -> None:
    """list/show/log/lineage/diff print hostile strings escaped, exit 0; --json round-trips them exactly."""
    for args in (["list"], ["show", "evil@1"]):  # the real CLI, in a process of its own
        r = run_cli(hostile_home, *args, env=WIDE)
        assert r.returncode == 0, (args, r.output)
        assert_no_traceback(r)
        assert_terminal_safe(r.stdout + r.stderr)
        assert_literal(r.stdout)
    assert "\\x0dfake" in r.stdout and "\\x00nul" in r.stdout and "\\u2066iso\\u2069" in r.stdout  # card, metrics, hub
    monkeypatch.setenv("COLUMNS", WIDE["COLUMNS"])
    for args in (["log", "evil"], ["lineage", "evil@1"], ["lineage", "evil@1", "--format", "mermaid"],
                 ["lineage", "evil@1", "--format", "dot"], ["diff", "evil@1", "evil@2"], ["list", "--task", TASK]):
        r = _invoke(hostile_home, *args)
        assert r.exit_code == 0 and r.exception is None, (args, r.output, r.exception)
        assert_terminal_safe(r.output)
        if args[0] in ("list", "log"):
            assert_literal(r.stdout)
        if args[0] == "lineage":
            assert "[/bold]" in r.stdout and "x1b[2J" in r.stdout

    listed = json.loads(_invoke(hostile_home, "list", "--json").stdout)
    assert {v["task"] for v in listed} == {TASK}
    raw = _invoke(hostile_home, "show", "evil@1", "--json").stdout
    doc = json.loads(raw)
    assert doc["task"] == TASK and doc["mask"]["method"] == HOSTILE and doc["metrics"][STORED] == 1.0
    assert doc["hub"]["repo"] == HOSTILE and doc["parents"][0]["params"]["path"] == HOSTILE
    assert_terminal_safe(raw)  # JSON escapes control characters (and all non-ASCII) itself
    lin = json.loads(_invoke(hostile_home, "lineage", "evil@1", "--json").stdout)
    assert lin["edges"][0]["params"]["format"] == HOSTILE


def test_deploy_history_escapes_forget_spec(hostile_home: Path) -> None:
    """deploy history's forget column (from the version's training config) is printed escaped."""
    assert _invoke(hostile_home, "deploy", "create", "d1", "--base", "tiny").exit_code == 0
    r = _invoke(hostile_home, "deploy", "apply", "d1", "evil@1")
    assert r.exit_code == 0, r.output
    h = run_cli(hostile_home, "deploy", "history", "d1", env=WIDE)
    assert h.returncode == 0, h.output
    assert_terminal_safe(h.stdout + h.stderr)
    assert_literal(h.stdout)
    events = json.loads(_invoke(hostile_home, "deploy", "history", "d1", "--json").stdout)
    assert events[-1]["forget"] == STORED


def test_one_renderer_and_error_line_escape_everything(capsys) -> None:
    """The shared table builder, echo and the error line: markup literal, controls visible, one line."""
    import click

    from adapterhub.cli.common import echo, handle_errors, print_table, safe_text
    from adapterhub.errors import CatalogError

    assert safe_text("a\x1b[2Jb\u202ec\rd\x9b") == "a\\x1b[2Jb\\u202ec\\x0dd\\x9b"
    assert safe_text("plain [bold] text ok") == "plain [bold] text ok"
    assert safe_text("héllo ✓ 模型") == "héllo ✓ 模型"
    print_table(["c"], [[HOSTILE]], title=HOSTILE)
    echo(f"pulled {HOSTILE}")
    out = capsys.readouterr().out
    assert_terminal_safe(out)
    assert "[/bold]" in out and "\\x1b]8;;http://evil" in out

    @handle_errors
    def boom() -> None:
        raise CatalogError(f"unknown thing {HOSTILE}\nsecond line")

    with pytest.raises(click.ClickException) as ei:
        boom()
    msg = ei.value.format_message()
    assert "\n" not in msg and "[/bold]" in msg and "\\x1b[2J" in msg
    assert_terminal_safe(msg)


def test_unopenable_catalog_error_names_it_in_one_escaped_line(tmp_path: Path) -> None:
    """An unopenable catalog is named in the one-line error, its control characters made visible."""
    r = run_cli(tmp_path / "h", "--db", f"sqlite:///{tmp_path}/no\x1b[2Jdir\u202e/x.db", "list")
    assert_one_line_failure(r, contains="cannot open the catalog database at")
    assert "no\\x1b[2Jdir\\u202e/x.db" in r.stderr
    assert_terminal_safe(r.stderr)


# -- one line instead of a traceback ----------------------------------------------------------------


def test_corrupt_catalog_file_is_one_line(hostile_home: Path) -> None:
    db = hostile_home / "catalog.db"
    for side in ("catalog.db-wal", "catalog.db-shm"):
        (hostile_home / side).unlink(missing_ok=True)
    db.write_bytes(os.urandom(8192))
    before = tree_snapshot(hostile_home)
    for args in (["list"], ["tag", "evil@1", "x"]):
        r = run_cli(hostile_home, *args)
        assert_one_line_failure(r, contains="is not a readable database")
        assert str(db) in r.stderr
    for args in (["show", "evil@1"], ["db", "current"], ["init"], ["untag", "evil", "prod"]):
        r = _invoke(hostile_home, *args)
        _one_line_cli_error(r, "is not a readable database")
    assert tree_snapshot(hostile_home) == before


def test_bad_home_db_url_and_lock_timeout_are_one_line(tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    r = run_cli(f, "list")
    assert_one_line_failure(r, contains="is not a directory")
    r = run_cli(None, "list", env={"ADAPTERHUB_HOME": str(f / "sub")})
    assert_one_line_failure(r, contains="home")
    assert r.returncode == 1
    r = run_cli(tmp_path / "h", "--db", "not a url", "list")
    assert_one_line_failure(r, contains="parse")
    _one_line_cli_error(_invoke(tmp_path / "h", "--db", "nosuchdialect://x/y", "list"), "nosuchdialect")
    r = run_cli(tmp_path / "h", "list", env={"ADAPTERHUB_LOCK_TIMEOUT": "abc"})
    assert_one_line_failure(r, contains="invalid lock timeout")
    assert r.returncode == 2
    for bad in ("0", "-1", "nan", "inf"):
        r = CliRunner().invoke(cli_root(), ["--home", str(tmp_path / "h"), "list"], env={"ADAPTERHUB_LOCK_TIMEOUT": bad})
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "invalid lock timeout" in r.stderr, r.output
    r = run_cli(tmp_path / "h", "--lock-timeout", "\x1b[2J", "list")
    assert_one_line_failure(r, contains="--lock-timeout")
    assert r.returncode == 2 and "\x1b" not in r.stderr


def cli_root():
    from adapterhub.cli.main import cli

    return cli


def _invoke(home: Path, *args: str):
    """The CLI in this process (for cases that patch the library, and to keep the tests fast)."""
    return CliRunner().invoke(cli_root(), ["--home", str(home), *args])


def _one_line_cli_error(r, contains: str) -> None:
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and contains in lines[0].lower(), r.stderr


def test_disk_full_is_one_line(hostile_home: Path, tmp_path: Path, monkeypatch) -> None:
    """ENOSPC escaping from register / deploy create / deploy apply: one line, exit 1."""
    from adapterhub.format import save_file
    from adapterhub.store import BlobStore

    f = tmp_path / "new.safetensors"
    save_file(make_adapter(seed=7), f)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(hostile_home / "blobs"))

    with monkeypatch.context() as m:
        m.setattr(BlobStore, "put_bytes", full)
        r = _invoke(hostile_home, "register", str(f), "--name", "evil", "--task", "t", "--base", "tiny")
    _one_line_cli_error(r, "disk is full")
    assert "ENOSPC" in r.stderr

    real_fsync = os.fsync
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        r = _invoke(hostile_home, "deploy", "create", "full1", "--base", "tiny")
    _one_line_cli_error(r, "disk is full")
    assert os.fsync is real_fsync
    assert _invoke(hostile_home, "deploy", "create", "d2", "--base", "tiny").exit_code == 0
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        r = _invoke(hostile_home, "deploy", "apply", "d2", "evil@1")
    _one_line_cli_error(r, "disk is full")


def test_tag_untag_stale_row_is_retried_or_one_line(hostile_home: Path, monkeypatch) -> None:
    """A StaleDataError (a row another process changed meanwhile) is retried, and if it persists, one line."""
    from sqlalchemy.orm import Session
    from sqlalchemy.orm.exc import StaleDataError

    real_flush = Session.flush
    fails = {"left": 1}

    def flaky_flush(self, *a, **k):
        if self.new or self.dirty or self.deleted:
            if fails["left"] > 0:
                fails["left"] -= 1
                raise StaleDataError("UPDATE statement on table 'tags' expected to update 1 row(s); 0 were matched.")
        return real_flush(self, *a, **k)

    monkeypatch.setattr(Session, "flush", flaky_flush)
    r = _invoke(hostile_home, "tag", "evil@2", "prod")  # moves prod: an UPDATE, first flush stale
    assert r.exit_code == 0 and fails["left"] == 0, (r.output, r.exception)
    assert json.loads(_invoke(hostile_home, "show", "evil@prod", "--json").stdout)["version"] == 2

    fails["left"] = 10 ** 6
    monkeypatch.setenv("ADAPTERHUB_LOCK_TIMEOUT", "1")
    r = _invoke(hostile_home, "tag", "evil@1", "prod")
    _one_line_cli_error(r, "catalog")
    monkeypatch.setattr(Session, "flush", real_flush)
    r = _invoke(hostile_home, "untag", "evil", "prod")
    assert r.exit_code == 0, r.output
    r = _invoke(hostile_home, "untag", "evil", "prod")  # already gone (e.g. another process): one line
    _one_line_cli_error(r, "no tag")


HOLDER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_held_catalog_lock_waits_visibly_then_fails_in_bounded_time(hostile_home: Path) -> None:
    """Another process holds the SQLite write lock: `tag`/`register`/`untag` say they wait, then give up."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(hostile_home / "catalog.db"), "60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_snapshot(hostile_home)
        t0 = time.monotonic()
        r = run_cli(hostile_home, "tag", "evil@2", "prod", env={"ADAPTERHUB_LOCK_TIMEOUT": "3"})
        took = time.monotonic() - t0
        _assert_lock_failure(r)
        assert 3 <= took < 15, took  # 3 s of waiting plus process start-up on a loaded machine
        t0 = time.monotonic()
        r = run_cli(hostile_home, "--lock-timeout", "2.5", "untag", "evil", "prod")
        _assert_lock_failure(r)
        assert 2.5 <= time.monotonic() - t0 < 15
        r = run_cli(hostile_home, "list", "--json")  # readers are not blocked by a writer in WAL mode
        assert r.returncode == 0 and len(json.loads(r.stdout)) == 2
        assert tree_snapshot(hostile_home) == before
    finally:
        holder.kill()
        holder.wait()
    r = run_cli(hostile_home, "tag", "evil@2", "prod")
    assert r.returncode == 0 and "waiting" not in r.stderr


def _assert_lock_failure(r) -> None:
    assert r.returncode == 1, r.output
    assert_no_traceback(r)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith("waiting for the catalog lock")
    assert lines[1].startswith("Error: the catalog database is locked by another process")


def test_hub_versions_table_escapes_card_strings(hostile_home: Path, hub_server, monkeypatch) -> None:
    """`hub versions` shows the task from each tag's card: a hostile one is printed literally."""
    from adapterhub.hub.client import push
    from adapterhub.workspace import Workspace

    with Workspace.open(hostile_home) as ws:
        push(ws, "evil@1", repo="alice/evil")
    monkeypatch.setenv("COLUMNS", WIDE["COLUMNS"])
    r = _invoke(hostile_home, "hub", "versions", "alice/evil")
    assert r.exit_code == 0 and r.exception is None, (r.output, r.exception)
    assert_terminal_safe(r.output)
    assert_literal(r.stdout)
    doc = json.loads(_invoke(hostile_home, "hub", "versions", "alice/evil", "--json").stdout)
    assert doc["versions"][0]["task"] == TASK
