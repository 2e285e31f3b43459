"""Helpers for the trust-boundary tests: run the real CLI in a process, snapshot a sandbox tree.

A hostile case passes when the command either succeeds harmlessly or exits non-zero with one line on
stderr and no traceback, and nothing outside the places it may write (the home and its own cache)
was created, changed or removed; after a failed command the catalog and the store are exactly as
before (compare :func:`tree_snapshot` of the home, and ``catalog_util.home_snapshot`` for rows).
"""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: SQLite's side files come and go with every connection; they are not state.
_VOLATILE_SUFFIXES = ("-wal", "-shm", "-journal")


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(home: Path | None, *args: str, env: dict[str, str] | None = None, timeout: float = 240,
            cwd: Path | None = None) -> CliResult:
    """Run ``adapterhub [--home HOME] ARGS`` as a real process with the test's environment (plus ``env``)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "adapterhub.cli.main"]
    if home is not None:
        cmd += ["--home", str(home)]
    cmd += list(args)
    p = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or ROOT,
                       stdin=subprocess.DEVNULL)
    return CliResult(p.returncode, p.stdout, p.stderr)


def assert_one_line_failure(r: CliResult, *, contains: str | None = None) -> None:
    """Non-zero exit, no traceback, exactly one non-empty line on stderr (optionally containing ``contains``)."""
    assert r.returncode != 0, f"expected failure, got rc=0\nstdout={r.stdout}\nstderr={r.stderr}"
    assert "Traceback" not in r.output, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{r.stderr}"
    if contains is not None:
        assert contains.lower() in lines[0].lower(), lines[0]


def assert_no_traceback(r: CliResult) -> None:
    assert "Traceback" not in r.output, r.output


def tree_snapshot(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``root`` (not following symlinks): relative path -> (kind, size, sha256/target).

    ``skip`` names sub-trees left out (e.g. a cache the command may legitimately fill). SQLite's
    ``-wal``/``-shm``/``-journal`` side files are left out too.
    """
    root = Path(root)
    out: dict[str, tuple[str, int, str]] = {}
    skip_s = tuple(str(Path(s)) for s in skip)
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        if any(str(d) == s or str(d).startswith(s + os.sep) for s in skip_s):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = d / name
            rel = str(p.relative_to(root))
            if name.endswith(_VOLATILE_SUFFIXES) or any(str(p) == s for s in skip_s):
                continue
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", 0, "")
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            else:  # FIFOs, sockets, devices: recorded by type only (reading a FIFO would block)
                out[rel] = ("special", 0, oct(stat.S_IFMT(st.st_mode)))
    return out


def diff_snapshots(before: dict[str, tuple[str, int, str]], after: dict[str, tuple[str, int, str]]) -> list[str]:
    """Human-readable differences between two :func:`tree_snapshot` results (empty when equal)."""
    out = []
    for k in sorted(set(before) | set(after)):
        if k not in before:
            out.append(f"created {k}")
        elif k not in after:
            out.append(f"removed {k}")
        elif before[k] != after[k]:
            out.append(f"changed {k}")
    return out
