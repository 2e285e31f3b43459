"""Catalog under load: 1,000,000 adapter versions in SQLite — API and real-CLI latencies.

Builds the synthetic catalog of ``benchmarks/catalog_scale.py`` (same layout: a 100-deep finetuned_from chain,
adapters of 10 versions, 100 tasks, ``prod``/``candidate`` tags; bulk insert through SQLAlchemy Core into the
schema made by the real Alembic migration) at N versions (default 1,000,000), then measures

* through the Workspace API (median of --repeat calls on seeded random targets): ``list --task`` (all matches
  and ``--limit 20``), ``show``, tag resolution ``name@prod``, a 100-deep lineage query (one recursive CTE);
* through the real CLI, a fresh ``adapterhub`` process each time (median of --cli-repeat):
  ``list --task T --limit 20 --json``, ``show REF --json``, ``show NAME@prod --json``, ``lineage TIP --json``.

Anchors measured in the same run: the same API calls on a 1,000-version catalog (the ratio shows how latency
grows with 1000x more rows), the 100-deep lineage walked hop by hop in Python, and ``adapterhub --version``
(process start-up, the floor under every CLI figure).

Usage:  nice .venv/bin/python benchmarks/catalog_load.py [--n 1000000] [--repeat 25] [--cli-repeat 5] [--write]
``--write`` writes docs/bench/reliability.md (the catalog_load section) and docs/img/catalog_load.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import catalog_scale as cs  # the synthetic catalog builder and API timings (this folder is on sys.path)
from benchutil import write_section


def _exe() -> list[str]:
    exe = Path(sys.executable).with_name("adapterhub")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "adapterhub.cli.main"]


def cli_ms(home: Path, args: list[str], repeat: int) -> float:
    """Median wall time of a fresh ``adapterhub`` process running ``args`` (must exit 0)."""
    env = dict(os.environ, ADAPTERHUB_HOME=str(home), HF_HUB_OFFLINE="1")
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run(_exe() + args, env=env, capture_output=True, text=True, timeout=600)
        ts.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"adapterhub {' '.join(args)} failed: {r.stderr.strip()[-500:]}")
        if "--json" in args:
            json.loads(r.stdout)  # exactly one JSON document
    return 1e3 * statistics.median(ts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="versions in the large catalog")
    ap.add_argument("--n-small", type=int, default=1_000, help="versions in the anchor catalog")
    ap.add_argument("--repeat", type=int, default=25)
    ap.add_argument("--cli-repeat", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="write docs/bench/reliability.md and docs/img/catalog_load.png")
    a = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ah-load-") as tmp:
        small_ws, small_facts = cs.build(Path(tmp) / "small", a.n_small)
        small = cs.run_queries(small_ws, small_facts, a.repeat)
        small_ws.close()
        print(f"built {a.n:,} versions ...", file=sys.stderr, flush=True)
        home = Path(tmp) / "big"
        ws, facts = cs.build(home, a.n)
        big = cs.run_queries(ws, facts, a.repeat)
        ws.close()
        db_bytes = sum(p.stat().st_size for p in home.glob("catalog.db*"))
        print(f"built in {facts['build_s']:.1f}s; API timings done", file=sys.stderr, flush=True)
        r = cs.random.Random(1)
        ea = facts["exp_adapters"]
        task = f"task-{r.randrange(min(cs.TASKS, ea))}"
        ref = f"exp-{r.randrange(ea)}@2"
        tagref = f"exp-{r.randrange(ea)}@prod"
        tip = f"chain-{cs.CHAIN}@1"
        cli = {
            "startup": cli_ms(home, ["--version"], a.cli_repeat),
            "list": cli_ms(home, ["list", "--task", task, "--limit", "20", "--json"], a.cli_repeat),
            "show": cli_ms(home, ["show", ref, "--json"], a.cli_repeat),
            "tag": cli_ms(home, ["show", tagref, "--json"], a.cli_repeat),
            "lineage": cli_ms(home, ["lineage", tip, "--json"], a.cli_repeat),
        }
    cmd = "nice .venv/bin/python benchmarks/catalog_load.py" + (f" --n {a.n}" if a.n != 1_000_000 else "") + " --write"
    lines = [
        "<!-- catalog_load:begin -->",
        f"## Catalog under load: {facts['versions']:,} versions (catalog_load)",
        "",
        f"Command: `{cmd}` (SQLite in WAL mode; {os.cpu_count()} CPUs, load average {load0:.1f} at the start — a shared "
        f"machine; Python {platform.python_version()}).",
        "",
        f"Catalog: {facts['versions']:,} versions of {facts['adapters']:,} adapters, {facts['edges']:,} lineage edges, "
        f"{facts['tags']:,} tags; bulk insert {facts['build_s']:.1f} s; database {db_bytes / 2**20:.0f} MiB. "
        f"`list --task` (all matches) returns {big['list_rows']:,} rows here and {small['list_rows']:,} at "
        f"{small_facts['versions']:,}.",
        "",
        "Through the Workspace API (median of %d calls):" % a.repeat,
        "",
        cs.table(small, big, small_facts["versions"], facts["versions"]),
        "",
        f"Through the real CLI, a fresh process per call (median of {a.cli_repeat}); the anchor is process start-up:",
        "",
        "| command | wall ms | minus start-up (ms) |",
        "|---|---|---|",
        f"| anchor: `adapterhub --version` | {cli['startup']:.0f} | 0 |",
        f"| `list --task T --limit 20 --json` | {cli['list']:.0f} | {cli['list'] - cli['startup']:.0f} |",
        f"| `show NAME@N --json` | {cli['show']:.0f} | {cli['show'] - cli['startup']:.0f} |",
        f"| `show NAME@prod --json` (tag) | {cli['tag']:.0f} | {cli['tag'] - cli['startup']:.0f} |",
        f"| `lineage TIP --json` (100 deep) | {cli['lineage']:.0f} | {cli['lineage'] - cli['startup']:.0f} |",
        "",
        f"At {facts['versions']:,} versions the 100-deep lineage CTE takes {big['lineage100_ms']:.1f} ms "
        f"({big['lineage100_python_ms'] / big['lineage100_ms']:.1f}x faster than walking it hop by hop), tag resolution "
        f"{big['tag_ms']:.1f} ms, `show` {big['show_ms']:.1f} ms and `list --task --limit 20` "
        f"{big['list_task_limit20_ms']:.1f} ms; listing every one of {big['list_rows']:,} matches takes "
        f"{big['list_task_ms']:.0f} ms (it materialises that many records).",
        "",
        "![catalog latency at 1M versions](../img/catalog_load.png)",
        "<!-- catalog_load:end -->",
    ]
    text = "\n".join(lines)
    print(text)
    if a.write:
        out = ROOT / "docs" / "bench" / "reliability.md"
        write_section(out, "catalog_load", text, title="# Reliability benchmarks\n")
        cs.plot(small, big, small_facts["versions"], facts["versions"], ROOT / "docs" / "img" / "catalog_load.png")
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
