"""Latency of the web view (``adapterhub ui``) on a 100,000-version catalog, against a running uvicorn.

Builds the catalog by bulk-inserting rows through SQLAlchemy Core (``catalog_scale.build``: adapters of 10
versions with finetuned_from chains, 100 tasks, tags, every 20th adapter a merge) plus one ``metric_rows``
row per version (``test_accuracy``, the sortable metric column), then starts ``adapterhub ui`` in a
subprocess (uvicorn, one worker) and times HTTP GETs over one keep-alive connection: the median of
--repeat requests per page, each on a different target where the page takes one.

Pages: the catalog's first page (50 rows, newest first), the catalog filtered by task, the catalog sorted
by the metric column, a page in the middle (page N/100), and a version page (a mid-chain version: its
lineage picture, metric history and card preview). The version files are not in the store (rows only), so
the per-tensor chart shows non-zeros without densities: reading a blob's header is not measured here.

Anchors measured in the same run: ``/api/versions`` (the same 50 rows as ``list --json`` through the same
server) and a plain SQL ``SELECT`` of the same 50 rows (version, adapter and base columns, no JSON decoding,
no HTML), in process.

Usage:  nice -n 10 .venv/bin/python benchmarks/ui_load.py [--n 100000] [--repeat 30] [--write]
``--write`` replaces the "ui_load" section of docs/bench/ui.md (then run benchmarks/collect.py).
"""
from __future__ import annotations

import argparse
import datetime as dt
import http.client
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sqlalchemy import insert, text

from adapterhub.catalog.current import rebuild as rebuild_current
from adapterhub.catalog.models import MetricRow
from benchutil import write_section
from catalog_scale import TASKS, build

SORT_NOTE = ("The page sorted by a metric reads each version's current figure from `current_metrics` (revision "
             "0007: kept as rows are added; here derived once from the bulk-inserted rows) through its `(name, "
             "value)` index and stops after 50; before 0007 it derived every version's figure from all 100,000 "
             "metric rows and ordered the whole catalog (298 ms in the previous run). The other pages read a page of "
             "ids from the indexes and then those 50 rows.")


def add_metrics(ws, n_versions: int, seed: int = 0) -> None:
    """One current ``test_accuracy`` row (with its n) per version, like a registration's train metrics."""
    rng = random.Random(seed)
    now = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    rows = [{"version_id": vid, "name": "test_accuracy", "value": round(rng.uniform(0.5, 0.95), 4), "split": "test",
             "n": 872, "full": True, "source": "train", "created_at": now} for vid in range(1, n_versions + 1)]
    with ws.engine.begin() as c:
        for i in range(0, len(rows), 20000):
            c.execute(insert(MetricRow), rows[i:i + 20000])
        rebuild_current(c)  # what registering them one by one would have kept in current_metrics
    with ws.engine.connect() as c:
        c.exec_driver_sql("ANALYZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adapterhub.cli.main", "--home", str(home), "ui", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(f"adapterhub ui exited: {out}") from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("adapterhub ui did not start in 120 s")


def median_get(conn: http.client.HTTPConnection, paths: list[str], repeat: int, expect: str | None = None) -> float:
    """Median milliseconds of GET over ``repeat`` requests (cycling through ``paths``), after one warm-up each."""
    def get(p: str) -> bytes:
        conn.request("GET", p, headers={"Host": "127.0.0.1"})
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {p}: {r.status} {body[:300]!r}")
        return body
    for p in paths[:3]:
        body = get(p)
        if expect and not re.search(expect.encode(), body):
            raise RuntimeError(f"GET {p}: the page lacks {expect!r}")
    ts = []
    for i in range(repeat):
        t0 = time.perf_counter()
        get(paths[i % len(paths)])
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def sql_anchor_ms(ws, repeat: int) -> float:
    """A plain SELECT of the first page's 50 rows (version, adapter and base columns), newest first."""
    q = text("SELECT v.id, a.name, v.number, a.kind, v.content_hash, v.size_bytes, v.task, b.name, v.density, "
             "v.nnz, v.dtype, v.created_at FROM adapter_versions v JOIN adapters a ON v.adapter_id = a.id "
             "JOIN base_models b ON a.base_id = b.id ORDER BY v.created_at DESC, v.id DESC LIMIT 50")
    ts = []
    with ws.engine.connect() as c:
        c.execute(q).all()
        for _ in range(repeat):
            t0 = time.perf_counter()
            rows = c.execute(q).all()
            ts.append(time.perf_counter() - t0)
    assert len(rows) == 50
    return 1e3 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--write", action="store_true", help="update the ui_load section of docs/bench/ui.md")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ui-load-") as tmp:
        home = Path(tmp) / "home"
        ws, facts = build(home, args.n)
        add_metrics(ws, facts["versions"])
        print(f"built {facts['versions']:,} versions, {facts['adapters']:,} adapters, {facts['edges']:,} edges, "
              f"{facts['tags']:,} tags in {facts['build_s']:.1f} s (+ {facts['versions']:,} metric rows)")
        rng = random.Random(1)
        n_exp = facts["exp_adapters"]
        port = free_port()
        proc = start_server(home, port)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            r = args.repeat
            deep = max(2, facts["versions"] // 100)  # the middle of the catalog
            versions = [f"/v/exp-{rng.randrange(n_exp)}@5" for _ in range(r)]
            tasks = [f"/?task=task-{rng.randrange(min(TASKS, n_exp))}" for _ in range(r)]
            res = {
                "catalog page 1 (50 rows)": median_get(conn, ["/"], r, 'id="versions"'),
                "catalog filtered by task": median_get(conn, tasks, r, 'class="ref"'),
                "catalog sorted by test_accuracy": median_get(conn, ["/?sort=test_accuracy&desc=1"], r, "metric-col"),
                f"catalog page {deep:,} (offset {(deep - 1) * 50:,})": median_get(conn, [f"/?page={deep}"], r,
                                                                                   'class="ref"'),
                "version page (lineage, card)": median_get(conn, versions, r, "svg"),
                "anchor: /api/versions (same 50 rows, JSON)": median_get(conn, ["/api/versions"], r),
            }
            conn.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        res["anchor: plain SQL SELECT of the 50 rows"] = sql_anchor_ms(ws, r)
        ws.close()
    api = res["anchor: /api/versions (same 50 rows, JSON)"]
    sql = res["anchor: plain SQL SELECT of the 50 rows"]
    lines = ["| request | median ms | ÷ /api/versions | ÷ plain SELECT | ≤ 100 ms |", "|---|---:|---:|---:|:---:|"]
    for k, ms in res.items():
        ok = "" if k.startswith("anchor") else ("yes" if ms <= 100 else "**no**")
        lines.append(f"| {k} | {ms:.1f} | {ms / api:.2f} | {ms / sql:.1f} | {ok} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        section = "\n".join([
            "<!-- ui_load:begin -->",
            f"## Web view at {facts['versions']:,} versions (ui_load)",
            "",
            f"Command: `nice -n 10 .venv/bin/python benchmarks/ui_load.py --n {args.n} --repeat {args.repeat} "
            f"--write` (SQLite in WAL mode; `adapterhub ui` served by uvicorn in its own process, one keep-alive "
            f"connection, median of {args.repeat} requests per row; 2 CPUs shared with other jobs, load average "
            f"{load:.1f} at the start; Python {platform.python_version()}). The catalog: "
            f"{facts['versions']:,} versions in {facts['adapters']:,} adapters (chains of 10 versions, 100 tasks, "
            "`prod`/`candidate` tags, every 20th adapter a merge) and one `test_accuracy` metric row per version; "
            "rows only (no adapter files), so the version page's per-tensor chart shows non-zeros without "
            "densities. Target: median ≤ 100 ms for the catalog page and the version page.",
            "",
            table,
            "",
            "Anchors, measured in the same run: `/api/versions` serves the same 50 rows as `list --json` through "
            "the same server (the page adds the count, the filter choices and the HTML); the plain SELECT is the "
            "50 rows' columns straight from SQLite, in process, no JSON decoding and no HTTP.",
            "",
            SORT_NOTE,
            "<!-- ui_load:end -->",
        ])
        doc = ROOT / "docs" / "bench" / "ui.md"
        write_section(doc, "ui_load", section, title="# Web view benchmarks\n")
        print(f"updated {doc}")


if __name__ == "__main__":
    main()
