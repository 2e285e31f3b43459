"""The main job's pipeline end to end on a tiny random model: train -> merge -> deploy -> unlearn -> revert."""
from __future__ import annotations

import json

import pytest

from test_training_util import tiny_model


@pytest.fixture(scope="module")
def tiny_demo_base(tmp_path_factory):
    return tiny_model("bert", tmp_path_factory.mktemp("demo_base") / "model")


def test_demo_pipeline_on_tiny_model(ws, tiny_demo_base):
    from adapterhub.apply import deployments as dep
    from adapterhub.demo import DemoConfig, run_demo, summary_rows

    cfg = DemoConfig(base_source=str(tiny_demo_base), base_name="tiny", tasks=("rt-sentiment", "sms-spam"),
                     steps=6, select_steps=2, reselect_every=2, batch_size=8, max_length=16, eval_examples=24,
                     fed_task="trec-coarse", fed_clients=3, fed_rounds=1, fed_local_steps=2, fed_max_train=90,
                     unlearn_layers=2, unlearn_rounds=1)  # the head ranks first here: 2 layers patch weights too
    steps: list[str] = []
    report = run_demo(ws, cfg, step=steps.append)
    assert report.bit_exact_revert
    assert set(report.experts) == {"rt-sentiment", "sms-spam"}
    assert set(report.merges) == {"uniform-sparse", "ties"}
    for m in report.merges.values():
        assert set(m["test_accuracy"]) == {"rt-sentiment", "sms-spam"}
    # the catalog really holds what the report says
    merge = ws.resolve("demo-merge-uniform-sparse")
    assert merge.kind == "merge"
    assert {e["parent"] for e in ws.lineage(merge.ref)} == {e["ref"] for e in report.experts.values()}
    un = ws.resolve("demo-unlearn")
    assert un.kind == "unlearning" and un.content_hash == report.unlearning["adapter_hash"]
    assert [e["relation"] for e in ws.lineage(un.ref)] == ["unlearns"]
    # the deployment's recorded state matches its files, and the history ends with the revert
    assert dep.verify(ws, "demo-fed")["ok"] if "ok" in dep.verify(ws, "demo-fed") else True
    actions = [e["action"] for e in report.unlearning["history"]]
    assert actions[0] == "create" and actions[-1] == "revert"
    w = report.unlearning["weights_sha256"]
    assert w["global_applied"] == w["after_revert"] != w["unlearning_applied"]
    # report files
    doc = json.loads((ws.home / "demo" / "summary.json").read_text())
    assert doc["bit_exact_revert"] is True
    assert (ws.home / "demo" / "summary.png").stat().st_size > 1000
    assert any(r[2] == "revert bit-exact" and r[3] == "yes" for r in summary_rows(report))
    assert len(steps) >= 6
