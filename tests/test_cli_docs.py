"""docs/cli.md is generated from the click app and must be current (regenerate with `make docs-cli`)."""
from __future__ import annotations

from pathlib import Path

from catalog_util import all_commands

ROOT = Path(__file__).resolve().parent.parent


def test_docs_cli_is_current():
    from adapterhub.cli.docgen import render

    want = render()
    have = (ROOT / "docs" / "cli.md").read_text() if (ROOT / "docs" / "cli.md").exists() else ""
    assert have == want, "docs/cli.md is stale: run `make docs-cli` (python -m adapterhub.cli.docgen > docs/cli.md)"


def test_every_command_is_documented():
    from adapterhub.cli.docgen import render
    from adapterhub.cli.main import cli

    text = render()
    for path in all_commands(cli):
        assert f"## `adapterhub {' '.join(path)}`" in text


def test_docgen_module_runs():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "adapterhub.cli.docgen"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("# adapterhub CLI reference"), r.stderr
