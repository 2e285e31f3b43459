"""CLI calls in one fresh Python process, for tests of what a command imports (torch) at start-up."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

_CODE = (
    "import sys, json; from adapterhub.cli.main import cli; from click.testing import CliRunner\n"
    "home, calls, outs = sys.argv[1], json.loads(sys.argv[2]), []\n"
    "for args in calls:\n"
    "    r = CliRunner().invoke(cli, ['--home', home, *args])\n"
    "    assert r.exit_code == 0, (args, r.output)\n"
    "    outs.append(r.stdout)\n"
    "print(json.dumps({'torch': 'torch' in sys.modules, 'out': outs}))\n")


def run_fresh(home: Path, *calls: Sequence[str]) -> tuple[bool, list[str]]:
    """Run each call (the arguments after ``--home HOME``) in one new process; each must exit 0. Returns whether
    that process imported torch, and each call's stdout. The environment is this process's (a Hub server's)."""
    out = subprocess.run([sys.executable, "-c", _CODE, str(home), json.dumps([list(c) for c in calls])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    return doc["torch"], doc["out"]
