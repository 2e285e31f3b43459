"""Metric history (issue 15): evaluations are rows, never overwrites; show/list present the latest full-split
figure; `adapterhub metrics`; `list --sort/--columns` in one query; the 0003 backfill. SQLite and PostgreSQL."""
from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from click.testing import CliRunner
from sqlalchemy import event, func, insert, select

from adapterhub.catalog import db
from adapterhub.catalog.models import Adapter, AdapterVersion, BaseModel, MetricRow
from adapterhub.cli.main import cli
from adapterhub.errors import CatalogError
from adapterhub.workspace import Workspace
from catalog_util import make_adapter

# the example: a full test split of 486 rows, then a 16-row subset
FULL = {"test_accuracy": 0.6255, "test_loss": 0.61, "test_n": 486}
SUBSET = {"test_accuracy": 0.5625, "test_loss": 0.7, "test_n": 16}


@pytest.fixture
def cws(home, catalog_url, tiny_bert_dir):
    w = Workspace.open(home, catalog_url)
    w.add_base("tiny", str(tiny_bert_dir))
    yield w
    w.close()


def _stored(ws: Workspace, ref: str):
    name, number = ref.split("@")
    with ws.session() as s:
        return s.scalar(select(AdapterVersion.metrics).join(Adapter).where(Adapter.name == name,
                                                                           AdapterVersion.number == int(number)))


def test_subset_eval_never_replaces_the_full_split_figure(cws):
    v = cws.register(make_adapter(seed=1), name="rt", task="t", base="tiny",
                     metrics={"train_loss": 0.4, "steps": 40, **FULL})
    assert v.metrics["test_accuracy"] == 0.6255
    after = cws.record_metrics("rt@1", SUBSET, full=False, dataset_hash="d" * 64, scorer="s")
    assert after.metrics["test_accuracy"] == 0.6255 and after.metrics["test_n"] == 486
    assert cws.resolve("rt@1").metrics["test_loss"] == 0.61
    assert _stored(cws, "rt@1") == {"train_loss": 0.4, "steps": 40, **FULL}  # the JSON is never rewritten
    hist = cws.metric_history("rt@1")
    assert [(r.name, r.value, r.n, r.full, r.source) for r in hist] == [
        ("steps", 40.0, None, True, "train"), ("test_accuracy", 0.6255, 486, True, "train"),
        ("test_loss", 0.61, 486, True, "train"), ("train_loss", 0.4, None, True, "train"),
        ("test_accuracy", 0.5625, 16, False, "eval"), ("test_loss", 0.7, 16, False, "eval")]
    assert hist[-1].dataset_hash == "d" * 64 and hist[-1].scorer == "s" and hist[-1].ref == "rt@1"
    assert hist[-1].created_at is not None and hist[-1].split == "test"
    # a later full-split eval is the new figure; the old rows stay
    cws.record_metrics("rt@1", {"test_accuracy": 0.65, "test_n": 486})
    assert cws.resolve("rt@1").metrics["test_accuracy"] == 0.65
    assert len(cws.metric_history("rt@1")) == 7
    # the same figures through list
    [listed] = cws.list_versions(name="rt")
    assert listed.metrics["test_accuracy"] == 0.65 and listed.metrics["test_n"] == 486


def test_only_subset_rows_are_shown_until_a_full_one_exists(cws):
    cws.register(make_adapter(seed=1), name="rt", task="t", base="tiny")
    cws.record_metrics("rt@1", SUBSET, full=False)
    assert cws.resolve("rt@1").metrics["test_accuracy"] == 0.5625
    cws.record_metrics("rt@1", FULL)
    cws.record_metrics("rt@1", {"test_accuracy": 0.1, "test_n": 3}, full=False)
    assert cws.resolve("rt@1").metrics["test_accuracy"] == 0.6255


def test_deployment_figures_are_history_only(cws):
    cws.register(make_adapter(seed=1), name="rt", task="t", base="tiny",
                 metrics={**FULL, "deployment:prod/test_accuracy": 0.99, "deployment:prod/test_n": 486})
    cws.record_metrics("rt@1", {"test_accuracy": 0.97, "test_n": 486}, source="deployment:prod")
    info = cws.resolve("rt@1")
    assert info.metrics == {"test_accuracy": 0.6255, "test_loss": 0.61, "test_n": 486}
    dep = [(r.name, r.value, r.n) for r in cws.metric_history("rt@1") if r.source == "deployment:prod"]
    assert dep == [("test_accuracy", 0.99, 486), ("test_accuracy", 0.97, 486)]
    for bad in ("deployment:", "hub", ""):
        with pytest.raises(CatalogError):
            cws.record_metrics("rt@1", {"x": 1.0}, source=bad)


def test_list_sort_and_columns(cws):
    figures = {"a": 0.3, "b": 0.9, "c": None, "d": 0.6}
    for i, (name, acc) in enumerate(figures.items()):
        cws.register(make_adapter(seed=i), name=name, task="t", base="tiny")
        if acc is not None:
            cws.record_metrics(f"{name}@1", {"test_accuracy": acc, "test_n": 10})
    cws.record_metrics("a@1", {"test_accuracy": 0.99, "test_n": 2}, full=False)  # a subset: no effect
    cws.record_metrics("a@1", {"test_accuracy": 0.95}, source="deployment:x")  # not a's own figure
    up = cws.list_versions(sort="test_accuracy", columns=["test_n"])
    assert [v.name for v in up] == ["a", "d", "b", "c"]
    assert [v.metrics.get("test_accuracy") for v in up] == [0.3, 0.6, 0.9, None]
    down = cws.list_versions(sort="test_accuracy", descending=True)
    assert [v.name for v in down] == ["b", "d", "a", "c"]
    assert [v.name for v in cws.list_versions(sort="test_accuracy", descending=True, limit=2)] == ["b", "d"]


def _count_queries(engine):
    seen: list[str] = []

    def on(conn, cursor, statement, *a):
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)
    event.listen(engine, "before_cursor_execute", on)
    return seen, lambda: event.remove(engine, "before_cursor_execute", on)


def test_sort_at_scale_is_one_query(home):
    """20,000 versions with two metrics each, written before revision 0007: the upgrade derives each version's
    current figure, and the sorted page is two queries (+ tags + current figures)."""
    n = 20_000
    home.mkdir(parents=True, exist_ok=True)
    old = db.make_engine(f"sqlite:///{home / 'catalog.db'}")
    db.upgrade(old, "0006")
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    with old.begin() as c:
        c.execute(insert(BaseModel), [{"id": 1, "name": "b", "source": "/x", "fingerprint": "0" * 64,
                                       "created_at": now}])
        c.execute(insert(Adapter), [{"id": i + 1, "name": f"a{i}", "kind": "expert", "base_id": 1, "created_at": now}
                                    for i in range(n)])
        c.execute(insert(AdapterVersion), [
            {"id": i + 1, "adapter_id": i + 1, "number": 1, "content_hash": f"{i:064x}", "size_bytes": 1, "task": "t",
             "nnz": 1, "metrics": {}, "created_at": now + dt.timedelta(seconds=i)} for i in range(n)])
        rows = []
        for i in range(n):
            acc = ((i * 7919) % n) / n  # a permutation: a unique best
            rows.append({"version_id": i + 1, "name": "test_accuracy", "value": acc, "split": "test", "n": 100,
                         "full": True, "source": "eval", "created_at": now})
            rows.append({"version_id": i + 1, "name": "test_accuracy", "value": 2.0, "split": "test", "n": 5,
                         "full": False, "source": "eval", "created_at": now})  # a later subset, higher
        c.execute(insert(MetricRow), rows)
    old.dispose()
    ws = Workspace.open(home)  # upgrades to head: current_metrics filled from the rows
    seen, stop = _count_queries(ws.engine)
    try:
        t0 = time.perf_counter()
        top = ws.list_versions(sort="test_accuracy", descending=True, limit=5, columns=["test_n"])
        took = time.perf_counter() - t0
    finally:
        stop()
        ws.close()
    want = sorted(range(n), key=lambda i: -((i * 7919) % n))[:5]
    assert [v.name for v in top] == [f"a{i}" for i in want]
    assert top[0].metrics["test_accuracy"] == (n - 1) / n and top[0].metrics["test_n"] == 100
    # the page's ids (sorted by the metric), their columns, tags, current figures of the page: never per row
    assert len(seen) == 4, seen
    assert took < 20, took  # generous: a shared CI core; about 0.2 s on a laptop


def run(home, *args):
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


def test_cli_metrics_show_and_list(home, tiny_bert_dir):
    with Workspace.open(home) as ws:
        ws.add_base("tiny", str(tiny_bert_dir))
        ws.register(make_adapter(seed=1), name="rt", task="t", base="tiny", metrics=FULL)
        ws.register(make_adapter(seed=2), name="rt", task="t", base="tiny", metrics={"test_accuracy": 0.7})
        ws.record_metrics("rt@1", SUBSET, full=False, scorer="sc")
    r = run(home, "metrics", "rt@1", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ref"] == "rt@1" and doc["current"]["test_accuracy"] == 0.6255 and doc["current"]["test_n"] == 486
    assert [(h["name"], h["value"], h["n"], h["full"], h["source"], h["shown"]) for h in doc["history"]] == [
        ("test_accuracy", 0.6255, 486, True, "train", True), ("test_loss", 0.61, 486, True, "train", True),
        ("test_accuracy", 0.5625, 16, False, "eval", False), ("test_loss", 0.7, 16, False, "eval", False)]
    r = run(home, "metrics", "rt@1")
    assert r.exit_code == 0 and "subset" in r.stdout and "0.5625" in r.stdout
    r = run(home, "show", "rt@1", "--json")
    assert json.loads(r.stdout)["metrics"]["test_accuracy"] == 0.6255
    r = run(home, "show", "rt@1")
    assert "test_accuracy=0.6255" in r.stdout and "test_n=486" in r.stdout
    r = run(home, "list", "--sort", "test_accuracy", "--desc", "--json")
    assert r.exit_code == 0, r.output
    assert [d["ref"] for d in json.loads(r.stdout)] == ["rt@2", "rt@1"]
    r = run(home, "list", "--sort", "test_accuracy", "--columns", "test_accuracy,test_n")
    assert r.exit_code == 0, r.output
    header = r.stdout.splitlines()
    assert any("test_n" in line for line in header) and r.stdout.index("rt@1") < r.stdout.index("rt@2")
    assert "486" in r.stdout
    for args, msg in ((["--desc"], "--desc needs --sort"), (["--columns", "a,,b"], "not a metric name"),
                      (["--sort", "a,b"], "not a metric name")):
        r = run(home, "list", *args)
        assert r.exit_code == 2 and msg in r.output, r.output
    r = run(home, "metrics", "rt@9")
    assert r.exit_code == 1


def test_upgrade_copies_existing_metrics_into_rows(tmp_path):
    """A catalog made before 0003 keeps showing its figures: numeric metrics become `train` rows."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        db.upgrade(engine, "0002")
        now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
        with engine.begin() as c:
            c.exec_driver_sql("INSERT INTO base_models (id, name, source, fingerprint, created_at) "
                              "VALUES (1, 'b', '/x', '0', ?)", (now,))
            c.exec_driver_sql("INSERT INTO adapters (id, name, kind, base_id, created_at) "
                              "VALUES (1, 'a', 'expert', 1, ?)", (now,))
            c.exec_driver_sql(
                "INSERT INTO adapter_versions (id, adapter_id, number, content_hash, size_bytes, nnz, metrics, "
                "created_at) VALUES (1, 1, 1, 'h', 1, 1, ?, ?)",
                (json.dumps({"test_accuracy": 0.5625, "test_n": 16, "note": "x",
                             "deployment:prod/test_accuracy": 0.9}), now))
        db.upgrade(engine)
        with engine.connect() as c:
            got = c.execute(select(MetricRow.name, MetricRow.value, MetricRow.n, MetricRow.source)
                            .order_by(MetricRow.id)).all()
        assert [tuple(r) for r in got] == [("test_accuracy", 0.9, None, "deployment:prod"),
                                          ("test_accuracy", 0.5625, 16, "train")]
        db.downgrade(engine, "0002")
        db.upgrade(engine)
    finally:
        engine.dispose()


def test_cli_eval_appends_rows_and_a_subset_does_not_replace(tmp_path):
    """The issue's case end to end: a full-split eval, then `--max-examples`, then a deployment eval."""
    import shutil

    from adapterhub.catalog.models import Deployment
    from test_training_cli import FAST
    from test_training_util import sentiment_rows, tiny_model, write_csv

    bert = tiny_model("bert", tmp_path / "bert")
    home = tmp_path / "h"
    with Workspace.open(home) as ws:
        ws.add_base("tb", str(bert))
    csv = write_csv(tmp_path / "toy.csv", sentiment_rows(60))
    assert run(home, "train", "--base", "tb", "--dataset", f"csv:{csv}", "--name", "toy", *FAST).exit_code == 0
    full = json.loads(run(home, "eval", "toy@1", "--dataset", f"csv:{csv}", "--json").stdout)
    assert full["full"] is True and full["source"] == "eval" and len(full["dataset_hash"]) == 64
    sub = run(home, "eval", "toy@1", "--dataset", f"csv:{csv}", "--max-examples", "2", "--json")
    assert sub.exit_code == 0, sub.output
    assert json.loads(sub.stdout)["n"] == 2 and json.loads(sub.stdout)["full"] is False
    shown = json.loads(run(home, "show", "toy@1", "--json").stdout)["metrics"]
    assert shown["test_accuracy"] == full["accuracy"] and shown["test_n"] == full["n"] > 2
    with Workspace.open(home) as ws:
        vid = ws.resolve("toy@1").id
        dep = tmp_path / "dep"
        shutil.copytree(bert, dep)  # base weights: a different score than toy@1's own
        with ws.session() as s:
            base = s.scalar(select(BaseModel).where(BaseModel.name == "tb"))
            s.add(Deployment(name="prod", base_id=base.id, path=str(dep),
                             stack=[{"version_id": vid, "ref": "toy@1", "scale": 1.0}]))
    d = run(home, "eval", "toy@1", "--dataset", f"csv:{csv}", "--deployment", "prod", "--json")
    assert d.exit_code == 0, d.output
    assert json.loads(d.stdout)["source"] == "deployment:prod"
    doc = json.loads(run(home, "metrics", "toy@1", "--json").stdout)
    assert doc["current"]["test_accuracy"] == full["accuracy"] and doc["current"]["test_n"] == full["n"]
    evals = [(h["source"], h["n"], h["full"]) for h in doc["history"] if h["name"] == "test_accuracy"]
    assert evals == [("eval", full["n"], True), ("eval", 2, False), ("deployment:prod", full["n"], True)]
    assert all(h["dataset_hash"] == full["dataset_hash"] for h in doc["history"] if h["source"] != "train")


def test_current_metrics_follow_every_row_and_pages_keep_the_order(cws):
    """Revision 0007's ``current_metrics`` equals the rule computed from the append-only rows after a random
    mix of full, subset, train, eval and deployment rows; and the sorted catalog read a page at a time (from
    that table's index, versions lacking the metric after) equals the one-query order, for every page size."""
    import random

    from adapterhub.catalog.current import rebuild
    from adapterhub.catalog.metrics import current_rows, present
    from adapterhub.catalog.models import CurrentMetric

    rnd = random.Random(7)
    names = [f"v{i}" for i in range(9)]
    for i, n in enumerate(names):
        metrics = {"test_accuracy": round(rnd.random(), 3), "test_n": 10} if i % 3 else {}
        cws.register(make_adapter(seed=i), name=n, task="t", base="tiny", metrics=metrics)
    for _ in range(40):
        ref = f"{rnd.choice(names[:7])}@1"
        source = rnd.choice(["eval", "eval", "train", "deployment:x"])
        cws.record_metrics(ref, {rnd.choice(["test_accuracy", "test_loss"]): round(rnd.random(), 2), "test_n": 5},
                           source=source, full=rnd.random() < 0.5)
    with cws.session() as s:
        table = {(r.version_id, r.name): r.value for r in s.scalars(select(CurrentMetric))}
    rule = {}  # the rule in Python (metrics.current_rows) over each version's whole history
    for v in cws.list_versions():
        rule.update({(v.id, r.name): r.value for r in current_rows(cws.metric_history(v.ref))})
    assert table == rule and len(table) >= 8
    # the catalog's overlay (list, show) reads the table: the same figures and <split>_n as the rule presents
    for v in cws.list_versions():
        assert v.metrics == present(v.metrics, current_rows(cws.metric_history(v.ref)))
        assert cws.resolve(v.ref).metrics == v.metrics
    with cws.engine.begin() as c:  # the bulk rebuild derives the same table
        rebuild(c)
    with cws.session() as s:
        assert {(r.version_id, r.name): r.value for r in s.scalars(select(CurrentMetric))} == table
    for metric in ("test_accuracy", "test_loss"):
        for desc in (False, True):
            whole = [v.id for v in cws.list_versions(sort=metric, descending=desc)]
            assert len(whole) == len(names)
            for size in (1, 2, 4, 5, 9, 20):
                paged = []
                for off in range(0, len(names), size):
                    paged += [v.id for v in cws.list_versions(sort=metric, descending=desc, limit=size, offset=off)]
                assert paged == whole, (metric, desc, size)
            shown = [v.metrics.get(metric) for v in cws.list_versions(sort=metric, descending=desc)]
            have = [x for x in shown if x is not None]
            assert have == sorted(have, reverse=desc) and shown[len(have):] == [None] * (len(shown) - len(have))
    # removing a version removes its current figures
    victim = cws.list_versions(sort="test_accuracy", limit=1)[0]
    cws.remove(victim.ref)
    with cws.session() as s:
        assert s.scalar(select(func.count()).select_from(CurrentMetric).where(
            CurrentMetric.version_id == victim.id)) == 0
