"""studies/generative_study.py end to end on a tiny random Llama with a chat template (seconds, not the real run)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from test_generative import _word_tokenizer
from test_training_util import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _study():
    sys.path.insert(0, str(ROOT / "studies"))
    spec = importlib.util.spec_from_file_location("generative_study", ROOT / "studies" / "generative_study.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["generative_study"] = mod  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_generative_study_runs_and_reports(tmp_path):
    base = tiny_model("llama", tmp_path / "llama")
    for f in base.glob("*.txt"):
        f.unlink()
    _word_tokenizer(base, chat=True)
    gs = _study()
    out = tmp_path / "report"
    rc = gs.main(["--base", str(base), "--tasks", "t2t-state-abbrev,t2t-sms-slang,t2t-city-state", "--steps", "4",
                  "--multitask-steps", "4", "--batch-size", "4", "--max-length", "32", "--eval-examples", "3",
                  "--max-new-tokens", "3", "--holdout-k", "1", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    res = doc["result"]
    tasks = ["t2t-state-abbrev", "t2t-sms-slang", "t2t-city-state"]
    for kind in ("element", "lora"):
        assert set(res["single"][kind]) == set(tasks)
        for m in ("average", "task-arithmetic", "ties"):
            assert set(res["held_in"][kind][m]) == set(tasks) and set(res["held_out"][kind][m]) == set(tasks)
            assert all(0 <= v <= 100 for v in res["held_in"][kind][m].values())
    assert sorted(f[0] for f in res["folds"]) == sorted(tasks) and all(len(f) == 1 for f in res["folds"])
    assert set(res["multitask"]["held_in"]) == set(tasks) and set(res["multitask"]["held_out"]) == set(tasks)
    assert set(res["curve"]["element"]) == {"2", "3"}
    rows = {(r["type"], r["merge"]): r for r in doc["table1"]}
    assert rows[("element", "average")]["paper"] == [51.44, 43.09] and rows[("lora", "ties")]["paper"] is None
    assert doc["machine"]["cpus"] and "load average" in doc["machine"]["uptime_before"]
    md = out.with_suffix(".md").read_text()
    assert "different model and different tasks" in md and "| element-sparse (CS) | average |" in md
    # a re-run finds every expert and score in the cache and reports the same numbers
    assert gs.main(["--base", str(base), "--tasks", "t2t-state-abbrev,t2t-sms-slang,t2t-city-state", "--steps", "4",
                    "--multitask-steps", "4", "--batch-size", "4", "--max-length", "32", "--eval-examples", "3",
                    "--max-new-tokens", "3", "--holdout-k", "1", "--work", str(tmp_path / "work"),
                    "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["result"]["held_in"] == res["held_in"]
