"""A small catalog for the web-view tests (tests/test_ui.py, tests/test_ui_browser.py): experts, a merge, an
unlearning version, a deployment with history, metric rows, a pushed version and a hostile task name."""
from __future__ import annotations

from pathlib import Path

from adapterhub.catalog.records import Parent
from catalog_util import make_adapter

HOSTILE = "<script>alert(1)</script>[red]x\x1b[31m"


def build_catalog(ws, base_dir: Path, *, deploy: bool = True) -> dict:
    """Fill ``ws``: base ``tiny``; experts ``alpha@1..2``, ``beta@1`` (task sentiment), ``evil@1`` (hostile
    task); ``mix@1`` merged_from alpha@2 (w=0.7) and beta@1 (w=0.3); ``forget@1`` unlearns mix@1;
    ``child@1`` finetuned_from mix@1; deployment ``prod`` = mix@1 then forget@1 (events 0..2); tag prod on
    alpha@2; alpha@2 pushed to the Hub. Returns the refs."""
    from adapterhub.apply import deployments

    ws.add_base("tiny", str(base_dir))
    a1 = ws.register(make_adapter(seed=1), name="alpha", task="sentiment", base="tiny",
                     metrics={"test_accuracy": 0.81, "test_n": 100})
    a2 = ws.register(make_adapter(seed=2), name="alpha", task="sentiment", base="tiny", parents=[Parent(a1.ref)],
                     metrics={"test_accuracy": 0.86, "test_n": 100})
    b1 = ws.register(make_adapter(seed=3), name="beta", task="sentiment", base="tiny",
                     metrics={"test_accuracy": 0.74, "test_n": 100})
    ev = ws.register(make_adapter(seed=4), name="evil", task=HOSTILE, base="tiny",
                     metrics={"test_accuracy": 0.5, HOSTILE: 1.0})
    mix = ws.register(make_adapter(seed=5), name="mix", task="sentiment", base="tiny", kind="merge",
                      parents=[Parent(a2.ref, "merged_from", 0.7), Parent(b1.ref, "merged_from", 0.3)],
                      metrics={"test_accuracy": 0.79, "test_n": 100})
    fg = ws.register(make_adapter(seed=6, density=0.05), name="forget", task="sentiment", base="tiny",
                     kind="unlearning", parents=[Parent(mix.ref, "unlearns", params={"forget": "class:1"})],
                     metrics={"ra": 0.77, "fa": 0.12, "mia": 0.51, "seconds": 1.5,
                              "global": {"ra": 0.79, "fa": 0.81, "mia": 0.68}},
                     training_config={"forget": {"spec": "class:1", "kind": "class"}})
    ch = ws.register(make_adapter(seed=7), name="child", task="sentiment", base="tiny", parents=[Parent(mix.ref)])
    ws.record_metrics(a2.ref, {"test_accuracy": 0.87, "test_n": 200}, scorer="exact")
    ws.tag(a2.ref, "prod")
    ws.set_hub(a2.ref, repo="alice/alpha", commit="a" * 40, tag="v2", endpoint="https://huggingface.co")
    if deploy:
        deployments.create(ws, "prod", "tiny")
        deployments.apply(ws, "prod", mix.ref)
        deployments.apply(ws, "prod", fg.ref)
    return {"a1": a1.ref, "a2": a2.ref, "b1": b1.ref, "evil": ev.ref, "mix": mix.ref, "forget": fg.ref,
            "child": ch.ref}
