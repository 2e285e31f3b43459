"""Hostile values in every place of the command line: each leaf command, each of its arguments and valued
options given values a user (or a script fed from outside) could type — empty, path tricks, huge and
non-finite numbers, escapes, URLs with passwords. Whatever the value, the command ends with exit 0, 1 or
2, never a traceback; an error is a short message that shows no password of a URL, and a refused command
changed nothing (every file of the home and its size, every catalog row).

Also the cases this sweep found, one test each: ``list --limit`` above SQL's 64-bit range, an empty
``db upgrade --revision``, a password in a misplaced ``--lock-timeout``.
"""
from __future__ import annotations

import os
import shutil
import stat
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import click
import pytest
from click.testing import CliRunner

from adapterhub.cli.main import cli
from adapterhub.textsafe import excerpt, redact_urls, visible
from catalog_util import all_commands, home_snapshot, write_adapter

SECRET = "s3cr3tPa55"
# Paths stay inside the test's own temp folders (the commands obey the paths they are given, and the tests may
# run as root): "fifo" is a FIFO the test makes in its working folder, "../up" lands in pytest's temp root.
HOSTILE = ["", "..", "../up/passwd", "fifo", "x" * 3000, "\x1b[31mred\x1b[0m", "名前@1", "a@b@c", "nope@99",
           "v@0", "-1", "1e999", "nan", "0", "999999999999999999999", "%s%n", "a\nb", "   ", "{}",
           f"postgresql://u:{SECRET}@127.0.0.1:1/x", f"http://u:{SECRET}@h/x"]
# long-running with any valid value: a server (ui), the demo; the model commands are swept as a second case
SKIP = {"ui", "demo"}
MODEL_COMMANDS = {"train", "fed", "unlearn", "eval"}


def _leaves(models: bool) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for path in all_commands(cli):
        cmd: click.Command = cli
        for name in path:
            cmd = cast(click.Group, cmd).commands[name]
        if not isinstance(cmd, click.Group) and path[0] not in SKIP and (path[0] in MODEL_COMMANDS) == models:
            yield path, cmd


def _invocations(cmd: click.Command, good: Callable[[click.Argument], list[str]],
                 values: list[str]) -> Iterator[list[str]]:
    """``cmd``'s arguments with one of ``values`` at a time: each argument in turn, every other argument given
    ``good(argument)`` (something that exists, so the value is what the command meets beyond its first lookup),
    then each valued option after all the good arguments."""
    pos = [p for p in cmd.params if isinstance(p, click.Argument)]
    opts = [p for p in cmd.params if isinstance(p, click.Option) and not p.is_flag and p.name != "help"]
    base = [good(p) for p in pos]
    for i in range(len(pos)):
        for h in values:
            yield [v for vs in base[:i] for v in vs] + [h] + [v for vs in base[i + 1:] for v in vs]
    for o in opts:
        for h in values:
            yield [v for vs in base for v in vs] + [o.opts[0], h]


def _good_arguments(path: tuple[str, ...], ref: str) -> Callable[[click.Argument], list[str]]:
    """What exists in :func:`_build_home`, by argument name: the REF, the adapter or deployment ``d``, the tag,
    and two REFs for a variadic argument (merge's REFS...: one is refused before any option is looked at)."""
    good = {"ref": [ref], "refs": [ref, "b@1"], "name": ["d" if path[0] == "deploy" else "a"], "tag": ["prod"]}
    return lambda p: good.get(p.name or "", [ref] if "ref" in (p.name or "") else ["x"])


def _build_home(root: Path, base_dir: Path) -> tuple[Path, str]:
    """A small home: a base, two adapters (one version each, one tagged ``prod``), a deployment ``d`` with ``a@1``
    applied. Returns the home and ``a@1``."""
    from adapterhub.workspace import Workspace

    home = root / "home0"
    with Workspace.open(home) as ws:
        ws.add_base("tiny", str(base_dir))
        a = ws.register(write_adapter(root / "a.safetensors", seed=1), name="a", task="t", base="tiny")
        ws.register(write_adapter(root / "b.safetensors", seed=2), name="b", task="t", base="tiny")
        ws.tag(a.ref, "prod")
    _ensure_deployment(home, a.ref)
    return home, a.ref


def _ensure_deployment(home: Path, ref: str) -> None:
    """Deployment ``d`` of ``home`` exists, with ``ref`` applied when it is made anew (a swept command may have
    removed it)."""
    from adapterhub.apply import deployments
    from adapterhub.workspace import Workspace

    with Workspace.open(home) as ws:
        if not ws.deployment_rows.exists("d"):
            deployments.create(ws, "d", "tiny")
            deployments.apply(ws, "d", ref)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> tuple[Path, str]:
    """:func:`_build_home`, copied afresh by each test that changes it (a copied home sees its deployments
    read-only: the deployment commands are swept on a home of their own)."""
    return _build_home(tmp_path_factory.mktemp("sweep"), tiny_bert_dir)


def _check(res: click.testing.Result, argv: list[str]) -> None:
    e = res.exception
    if e is not None and not isinstance(e, SystemExit):
        pytest.fail(f"{argv[:8]!r} raised {''.join(traceback.format_exception(e))[-1500:]}")
    assert "Traceback" not in res.output, (argv[:8], res.output[-800:])
    assert res.exit_code in (0, 1, 2), (argv[:8], res.exit_code, res.output[-400:])
    if res.exit_code:  # (a success may echo what it was told to write: `export REF OUT` names OUT, a path)
        assert SECRET not in res.output, (argv[:8], res.output[-400:])
        assert len(res.output) < 4000, (argv[:8], res.output[-400:])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("models", [False, True], ids=["catalog-hub-deploy", "model-commands"])  # ~12 s, ~17 s
def test_every_command_survives_hostile_values(seeded: tuple[Path, str], tmp_path: Path, tiny_bert_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch, models: bool) -> None:
    """About 1,700 in-process invocations (about 3,000 for the model commands), each on a fresh copy of a small
    home; the deployment commands on one live home whose deployment ``d`` they may change (a copied home's
    deployments are read-only to it), remade when one removed it. A refused invocation leaves the home as it was."""
    home0, ref = seeded
    live, _ = _build_home(tmp_path / "live", tiny_bert_dir)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # output paths typed as hostile values land here, not in the checkout
    os.mkfifo(work / "fifo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub commands must not leave the machine
    runner = CliRunner()
    n = 0
    base_snap = home_snapshot(home0)
    for path, cmd in _leaves(models):
        for args in _invocations(cmd, _good_arguments(path, ref), HOSTILE):
            home = live if path[0] == "deploy" else tmp_path / "home"
            if home != live:
                shutil.rmtree(home, ignore_errors=True)
                shutil.copytree(home0, home)
            argv = ["--home", str(home), *path, *args]
            before = home_snapshot(home) if home == live else base_snap
            res = runner.invoke(cli, argv)
            _check(res, argv)
            if res.exit_code:  # refused: nothing changed (every file and size, every catalog row)
                after = home_snapshot(home)
                assert after == before, (argv[2:8], res.output[-300:],
                                         sorted(set(after[0]) ^ set(before[0])),
                                         [t for t in after[1] if after[1][t] != before[1].get(t)])
            if home == live:
                _ensure_deployment(live, ref)
            n += 1
    assert n > 1000
    assert stat.S_ISFIFO(os.lstat(work / "fifo").st_mode)  # never replaced by a file


HUB_VALUES = [*HOSTILE, "bob/x", "bob/x@v1", "bob/x@v99", "bob/../x", "../../x", "bob/x@refs/pr/1", "bob/x@main",
              "bob/x@" + "a" * 40]


@pytest.mark.timeout(600)
def test_hub_commands_survive_hostile_values_against_a_live_hub(seeded: tuple[Path, str], tmp_path: Path,
                                                                 hub_server: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``push``, ``pull`` and every ``hub`` command against the test Hub server holding ``bob/x@v1``: each argument
    and valued option given the hostile values and Hub-shaped ones (other revisions, traversal in a repo id)."""
    home0, ref = seeded
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    os.mkfifo(work / "fifo")
    runner = CliRunner()
    home = tmp_path / "home"
    shutil.copytree(home0, home)
    first = runner.invoke(cli, ["--home", str(home), "push", ref, "--repo", "bob/x"])
    assert first.exit_code == 0, first.output
    hub_group = cast(click.Group, cli.commands["hub"])
    n = 0
    for path in [("push",), ("pull",), *(("hub", k) for k in sorted(hub_group.commands))]:
        cmd = cli.commands[path[0]] if len(path) == 1 else hub_group.commands[path[1]]
        for args in _invocations(cmd, lambda p: [ref if p.name == "ref" else "bob/x@v1"], HUB_VALUES):
            shutil.rmtree(home)
            shutil.copytree(home0, home)
            argv = ["--home", str(home), *path, *args]
            _check(runner.invoke(cli, argv), argv)
            n += 1
    assert n > 200


def test_export_never_replaces_a_fifo_or_a_socket(seeded: tuple[Path, str], tmp_path: Path) -> None:
    import socket

    home = tmp_path / "home"
    shutil.copytree(seeded[0], home)
    fifo, sock = tmp_path / "fifo", tmp_path / "sock"
    os.mkfifo(fifo)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    try:
        for out, is_kind in ((fifo, stat.S_ISFIFO), (sock, stat.S_ISSOCK)):
            res = CliRunner().invoke(cli, ["--home", str(home), "export", seeded[1], str(out)])
            assert res.exit_code == 1 and "not a regular file" in res.output, res.output
            assert is_kind(os.lstat(out).st_mode)
            assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    finally:
        s.close()


def test_list_limit_beyond_sql_integers_lists_everything(seeded: tuple[Path, str], tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(seeded[0], home)
    runner = CliRunner()
    every = runner.invoke(cli, ["--home", str(home), "list", "--json"])
    huge = runner.invoke(cli, ["--home", str(home), "list", "--json", "--limit", "9" * 30])
    assert every.exit_code == huge.exit_code == 0, huge.output
    assert huge.output == every.output


def test_library_limit_and_offset_bounds(seeded: tuple[Path, str], tmp_path: Path) -> None:
    from adapterhub.errors import CatalogError
    from adapterhub.workspace import Workspace

    home = tmp_path / "home"
    shutil.copytree(seeded[0], home)
    with Workspace.open(home) as ws:
        every = [v.ref for v in ws.list_versions()]
        assert [v.ref for v in ws.list_versions(limit=2**70)] == every
        assert [v.ref for v in ws.list_versions(limit=2**63 - 1)] == every
        assert ws.list_versions(limit=5, offset=2**70) == []
        with pytest.raises(CatalogError, match=">= 0"):
            ws.list_versions(limit=-1)


def test_empty_upgrade_revision_is_one_line_and_changes_nothing(seeded: tuple[Path, str], tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(seeded[0], home)
    before = (home / "catalog.db").read_bytes()
    res = CliRunner().invoke(cli, ["--home", str(home), "db", "upgrade", "--revision", ""])
    assert res.exit_code == 1 and res.exception is None or isinstance(res.exception, SystemExit), res.output
    assert res.output.strip().count("\n") == 0 and "revision is empty" in res.output
    assert (home / "catalog.db").read_bytes() == before


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_password_in_a_misplaced_value_is_not_echoed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        how: str) -> None:
    url = f"postgresql://alice:{SECRET}@127.0.0.1:1/hub"
    if how == "env":
        monkeypatch.setenv("ADAPTERHUB_LOCK_TIMEOUT", url)
    argv = ["--home", str(tmp_path / "h")] + (["--lock-timeout", url] if how == "flag" else []) + ["list"]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 2, res.output
    assert SECRET not in res.output and "postgresql://***@127.0.0.1:1/hub" in res.output


@pytest.mark.parametrize("value", [f"http://u:{SECRET}@h", f"postgresql://alice:{SECRET * 6}@h/x"])
def test_library_lock_timeout_error_has_no_password(value: str) -> None:
    """Also when the password is longer than the quoted excerpt: passwords go first, the cut after."""
    from adapterhub.catalog.db import lock_timeout_setting
    from adapterhub.errors import CatalogError

    with pytest.raises(CatalogError) as e:
        lock_timeout_setting(value)
    assert SECRET[:4] not in str(e.value) and "***@" in str(e.value)


def test_excerpt_redacts_before_it_cuts() -> None:
    long = f"postgresql://alice:{SECRET * 6}@db.example/hub"
    assert redact_urls(long[:40]) == "postgresql://***"  # cut first: only the cut-userinfo rule catches it
    assert excerpt(long) == "postgresql://***@db.example/hub"
    assert excerpt("x" * 100, 10) == "x" * 10


@pytest.mark.parametrize(("text", "shown"), [
    (f"postgresql://u:{SECRET}@127.0.0.1:1/x", "postgresql://***@127.0.0.1:1/x"),
    (f"postgresql://u:p@{SECRET}@h/x", "postgresql://***@h/x"),  # an unencoded @ in the password
    (f"see http://a:{SECRET}@h/x and s3://k:{SECRET}@b/p", "see http://***@h/x and s3://***@b/p"),
    ("user@example.com", "user@example.com"),
    ("http://h/x@y", "http://h/x@y"),
    ("http://host and user@mail", "http://host and user@mail"),
    ("plain", "plain"),
    (f"adapter name 'postgresql://u:{SECRET}' contains", "adapter name 'postgresql://***' contains"),  # cut at '@'
    ("'http://host:8080'", "'http://host:8080'"),  # a port is not a password
    ("http://host:8080/x and http://[::1]:8080/x", "http://host:8080/x and http://[::1]:8080/x"),
    ("sqlite:////tmp/catalog.db", "sqlite:////tmp/catalog.db"),
])
def test_redact_urls(text: str, shown: str) -> None:
    assert redact_urls(text) == shown
    assert visible(text) == shown


def test_ref_number_limits_say_so() -> None:
    from adapterhub.catalog.refs import parse_ref
    from adapterhub.errors import RefError

    with pytest.raises(RefError, match="at most 9 digits"):
        parse_ref("a@" + "1" * 10)
    with pytest.raises(RefError, match="at most 9 digits"):
        parse_ref("a@~" + "1" * 10)
    with pytest.raises(RefError) as e:
        parse_ref("a@0")
    assert "digits" not in str(e.value)
