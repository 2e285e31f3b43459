"""REF and NAME parameter types on every command, checked before torch; library errors get the CLI's flag."""
from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from adapterhub.cli.common import handle_errors
from adapterhub.cli.main import cli
from adapterhub.cli.paramtypes import NameType, RefType
from adapterhub.errors import MergeError

BAD_REF, BAD_NAME = "a@0", "../x"

# (argv with {ref}/{name} slots, which slot is bad) for every command argument/option taking a REF or a name
CASES = [
    (["show", BAD_REF], "REF"),
    (["tag", BAD_REF, "prod"], "REF"),
    (["tag", "a@1", BAD_NAME], "TAG"),
    (["log", BAD_NAME], "NAME"),
    (["untag", BAD_NAME, "t"], "NAME"),
    (["lineage", BAD_REF], "REF"),
    (["diff", "a@1", BAD_REF], "REF"),
    (["verify", BAD_REF], "[REFS]"),
    (["export", BAD_REF, "out"], "REF"),
    (["base", "add", BAD_NAME, "minilm"], "NAME"),
    (["list", "--base", BAD_NAME], "--base"),
    (["merge", "a", BAD_REF, "--method", "uniform", "--name", "m"], "REFS"),
    (["merge", "a", "b", "--method", "uniform", "--name", BAD_NAME], "--name"),
    (["deploy", "create", BAD_NAME, "--base", "b"], "NAME"),
    (["deploy", "create", "d", "--base", BAD_NAME], "--base"),
    (["deploy", "apply", "d", BAD_REF], "REF"),
    (["deploy", "revert", BAD_NAME], "NAME"),
    (["deploy", "rollback", BAD_NAME, "--to", "1"], "NAME"),
    (["deploy", "history", BAD_NAME], "NAME"),
    (["deploy", "verify", BAD_NAME], "NAME"),
    (["push", BAD_REF], "REF"),
    (["pull", "alice/rt", "--name", BAD_NAME], "--name"),
    (["train", "--base", BAD_NAME, "--task", "rt-sentiment"], "--base"),
    (["train", "--base", "b", "--task", "rt-sentiment", "--name", BAD_NAME], "--name"),
    (["eval", BAD_REF], "[REF]"),
    (["eval", "--deployment", BAD_NAME], "--deployment"),
    (["fed", "train", "--base", BAD_NAME, "--task", "t", "--clients", "2", "--name", "f"], "--base"),
    (["unlearn", BAD_REF, "--forget", "class:x", "--name", "u"], "REF"),
    (["unlearn", "g", "--forget", "class:x", "--name", BAD_NAME], "--name"),
]


@pytest.mark.parametrize("argv,param", CASES, ids=[" ".join(c[0][:2]) + f" {c[1]}" for c in CASES])
def test_a_bad_ref_or_name_is_a_usage_error_naming_the_parameter(tmp_path, argv, param):
    r = CliRunner().invoke(cli, ["--home", str(tmp_path), *argv])
    assert r.exit_code == 2, r.output
    assert f"Invalid value for '{param}" in r.output and ("invalid ref" in r.output or "'..'" in r.output), r.output


def test_the_checks_run_before_torch_is_imported(tmp_path):
    """The REF/NAME types are eager: a lazily filled --method choice (torch) is never converted first."""
    code = ("import sys; from click.testing import CliRunner; from adapterhub.cli.main import cli; "
            f"r = CliRunner().invoke(cli, ['--home', {str(tmp_path)!r}, 'merge', 'a', 'b/c', '--method', 'uniform', "
            "'--name', 'm']); print(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stderr


def test_types_return_valid_values_unchanged():
    assert RefType().convert("rt@prod", None, None) == "rt@prod"
    assert NameType("tag").convert("v1.0-rc", None, None) == "v1.0-rc"


def test_a_library_error_gets_the_commands_own_flag_for_its_keywords():
    @click.command()
    @click.option("--lambda", "lam", type=float)
    @click.option("--density", type=float)
    @handle_errors
    def cmd(lam: float | None, density: float | None) -> None:
        raise MergeError("method 'x' does not take lam (it takes: density)", keywords=("lam", "gamma"))

    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 1
    assert r.output == "Error: method 'x' does not take lam (it takes: density) (option --lambda)\n"


def test_a_root_option_is_named_too_and_no_keyword_means_no_hint():
    from adapterhub.cli.common import library_message

    with click.Context(cli, info_name="adapterhub") as root, click.Context(cli.commands["list"], parent=root):
        assert library_message(MergeError("busy", keywords=("lock_timeout",))) == "busy (option --lock-timeout)"
        assert library_message(MergeError("plain")) == "plain"
