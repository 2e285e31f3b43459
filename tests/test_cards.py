"""The model card (``README.md``) a push writes: exact text for a pinned version, curated metrics,
targets, usage snippets, lineage, determinism, and hostile catalog strings that stay inert."""
from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from adapterhub.hub.cards import build_model_card, md_code, md_text, model_card_text, task_metrics


def pinned_card() -> dict[str, Any]:
    """An ``adapterhub.json`` card with every kind of metric a catalog holds, a regex target and a parent."""
    return {
        "format": "adapterhub.hub/1", "name": "rt", "version": 2, "content_hash": "ab" * 32,
        "file": "adapter.safetensors", "size_bytes": 1234, "kind": "expert", "task": "rt-sentiment",
        "labels": ["neg", "pos"],
        "base": {"name": "minilm", "fingerprint": "f" * 16, "source": "builtin:minilm", "revision": None,
                 "architecture": "BertModel", "hub_id": "sentence-transformers/all-MiniLM-L6-v2"},
        "mask": {"method": "connection-sensitivity", "density": 0.05, "granularity": "element", "block_size": None,
                 "targets": r"attention\.self\.(query|value)", "nnz": 4096, "dtype": "float32"},
        "metrics": {"test_accuracy": 0.6255, "test_n": 486, "test_loss": 0.66, "validation_accuracy": 0.61,
                    "validation_n": 100, "steps": 200, "train_seconds": 12.5, "steps_per_second": 16.0,
                    "trainable_values": 4096, "deployment:prod/test_accuracy": 0.7, "deployment:prod/test_n": 486,
                    "sms-spam/test_accuracy": 0.5, "sms-spam/test_n": 50},
        "training": {"steps": 200, "lr": 0.001},
        "lineage": [{"relation": "finetuned_from", "weight": 0.5, "params": {"method": "ties"},
                     "parent": {"name": "rt", "version": 1, "content_hash": "cd" * 32,
                                "hub": {"repo": "alice/rt", "tag": "v1", "commit": None}}}],
    }


EXPECTED = r'''---
base_model: sentence-transformers/all-MiniLM-L6-v2
datasets:
- rt-sentiment
library_name: adapterhub
metrics:
- accuracy
tags:
- adapterhub
- sparse-adapter
- rt-sentiment
base_model_relation: adapter
model-index:
- name: alice/rt
  results:
  - task:
      type: text-classification
    dataset:
      name: rt-sentiment
      type: rt-sentiment
      split: test
    metrics:
    - type: accuracy
      value: 0.6255
      name: accuracy (test, n=486)
  - task:
      type: text-classification
    dataset:
      name: rt-sentiment
      type: rt-sentiment
      split: validation
    metrics:
    - type: accuracy
      value: 0.61
      name: accuracy (validation, n=100)
  - task:
      type: text-classification
    dataset:
      name: sms-spam
      type: sms-spam
      split: test
    metrics:
    - type: accuracy
      value: 0.5
      name: accuracy (test, n=50)
---

# rt v2

A sparse **expert** adapter for `minilm` ([sentence-transformers/all-MiniLM-L6-v2](https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2)), task `rt-sentiment`, made with adapterhub.

- file: `adapter.safetensors` sha256 `abababababababababababababababababababababababababababababababab`
- base fingerprint: `ffffffffffffffff`

## Mask

| method | density | granularity | block size | non-zeros | dtype |
|---|---|---|---|---|---|
| connection-sensitivity | 0.05 | element | — | 4096 | float32 |

Targets: regex `attention\.self\.(query|value)`

## Metrics

| task | split | metric | value | n |
|---|---|---|---|---|
| rt-sentiment | test | accuracy | 0.6255 | 486 |
| rt-sentiment | validation | accuracy | 0.61 | 100 |
| sms-spam | test | accuracy | 0.5 | 50 |

## Use it

With adapterhub (the weights are checked against the sha256 above):

```bash
adapterhub pull alice/rt@v2
```

```python
import adapterhub
from transformers import AutoModel

model = AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
with adapterhub.activate(model, "alice/rt@v2") as handle:  # leaving the block reverts exactly
    print(handle.predict(["an example sentence"]))
```

With PEFT, export the pulled version as a PEFT SHiRA folder first:

```bash
adapterhub export alice--rt@1 ./rt-peft --format peft  # the first version pulled under alice--rt
```

```python
from peft import PeftModel
from transformers import AutoModel

model = PeftModel.from_pretrained(AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2"), "./rt-peft")
```

## Training config

```json
{
  "lr": 0.001,
  "steps": 200
}
```

## Lineage

- `finetuned_from`: [rt@1](https://huggingface.co/alice/rt/tree/v1) (`alice/rt@v1`), weight 0.5, method `ties`
'''


def test_pinned_card_text_is_exact_and_deterministic() -> None:
    text = str(build_model_card(pinned_card(), repo_id="alice/rt"))
    assert text == EXPECTED
    # same version -> same bytes, whatever the order the metrics were recorded in
    shuffled = pinned_card()
    shuffled["metrics"] = dict(reversed(list(shuffled["metrics"].items())))
    assert str(build_model_card(shuffled, repo_id="alice/rt")) == text


def test_metrics_are_curated_task_metrics_only() -> None:
    rows = task_metrics(pinned_card())
    assert rows == [
        {"task": "rt-sentiment", "split": "test", "metric": "accuracy", "value": 0.6255, "n": 486},
        {"task": "rt-sentiment", "split": "validation", "metric": "accuracy", "value": 0.61, "n": 100},
        {"task": "sms-spam", "split": "test", "metric": "accuracy", "value": 0.5, "n": 50},
    ]
    for word in ("steps", "train_seconds", "deployment", "prod", "trainable_values", "loss"):
        assert word not in EXPECTED.split("## Use it")[0].replace("sparse-adapter", ""), word
    # a bare metric key (no split) belongs to the card's task; f1/rouge are task metrics too; NaN is not a figure
    assert task_metrics({"task": "t", "metrics": {"accuracy": 0.8, "test_f1": 0.5, "rougeL": 0.3,
                                                  "test_accuracy": float("nan"), "ok": True}}) == [
        {"task": "t", "split": None, "metric": "accuracy", "value": 0.8, "n": None},
        {"task": "t", "split": None, "metric": "rougeL", "value": 0.3, "n": None},
        {"task": "t", "split": "test", "metric": "f1", "value": 0.5, "n": None},
    ]


@pytest.mark.parametrize("targets,line", [
    (r"(query|key|value)$", "Targets: regex `(query|key|value)$`"),
    (["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.value"],
     "Targets: `encoder.layer.0.attention.self.query`, `encoder.layer.1.attention.self.value`"),
    (None, "Targets: —"),
])
def test_targets_regex_or_list(targets: Any, line: str) -> None:
    card = pinned_card()
    card["mask"]["targets"] = targets
    text = str(build_model_card(card, repo_id="alice/rt"))
    assert [x for x in text.splitlines() if x.startswith("Targets:")] == [line]


def test_merge_card_lists_parent_repos_and_weights() -> None:
    card = pinned_card()
    card.update(kind="merge", name="rt-spam", version=1)
    card["lineage"] = [{"relation": "merged_from", "weight": w, "params": {"method": "uniform-sparse"},
                        "parent": {"name": n, "version": 1, "hub": {"repo": f"alice/{n}", "tag": "v1"}}}
                       for n, w in (("rt", 0.5), ("spam", 0.5))]
    mc = build_model_card(card, repo_id="alice/rt-spam")
    assert mc.data.base_model == ["alice/rt", "alice/spam"] and mc.data.base_model_relation == "merge"
    assert str(mc).split("## Lineage\n\n")[1] == (
        "- `merged_from`: [rt@1](https://huggingface.co/alice/rt/tree/v1) (`alice/rt@v1`), weight 0.5, "
        "method `uniform-sparse`\n"
        "- `merged_from`: [spam@1](https://huggingface.co/alice/spam/tree/v1) (`alice/spam@v1`), weight 0.5, "
        "method `uniform-sparse`\n")


EVIL = '<img src=x onerror=alert(1)> [click](https://evil.example) `x` | y\n# H <script>s</script> www.evil.example'


def _render(markdown: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").render(markdown)


def test_hostile_strings_stay_inert() -> None:
    card = pinned_card()
    card.update(name=EVIL, kind=EVIL, task=EVIL, labels=[EVIL])
    card["base"].update(name=EVIL, fingerprint=EVIL, hub_id="javascript:alert(1)")
    card["mask"].update(method=EVIL, targets=[EVIL, "query"], dtype=EVIL)
    card["metrics"] = {EVIL + "/test_accuracy": 0.1, "test_accuracy": 0.7, "<a href=x>/test_accuracy": 0.2, EVIL: 1.0}
    card["training"] = {"note": "```\n" + EVIL}
    card["lineage"] = [{"relation": EVIL, "weight": EVIL, "params": {"method": EVIL},
                        "parent": {"name": EVIL, "version": EVIL,
                                   "hub": {"repo": "alice/rt", "tag": "v1) [x](https://evil.example", "commit": EVIL}}}]
    before = copy.deepcopy(card)
    mc = build_model_card(card, repo_id="alice/rt")
    assert card == before  # the input is not modified
    text = str(mc)
    # front matter: no hostile value reaches the YAML (tags, datasets, model-index need Hub-safe ids)
    meta = text.split("---\n")[1]
    assert "evil" not in meta and "<" not in meta and "javascript" not in meta
    assert mc.data.base_model is None and mc.data.eval_results is None and mc.data.datasets is None
    assert mc.data.tags == ["adapterhub", "sparse-adapter"]
    # body: every hostile string is inside a code span or a code block, so the HTML holds no element,
    # link or heading of its own
    body = text.split("---\n", 2)[2]
    html = _render(body)
    outside_code = re.sub(r"<code[^>]*>.*?</code>", "", html, flags=re.S)
    assert "evil" not in outside_code and "<img" not in outside_code and "<script" not in outside_code
    assert re.findall(r'href="([^"]*)"', html) == [
        "https://huggingface.co/alice/rt/tree/main"]  # only the validated parent repo (unsafe tag -> main)
    assert [h for h in re.findall(r"<h(\d)>", html)] == ["1", "2", "2", "2", "2", "2"]  # no injected heading
    rows = re.findall(r"<tr>(.*?)</tr>", html, flags=re.S)  # header + one row per table: no injected row or cell
    assert [len(re.findall(r"<t[dh]>", r)) for r in rows] == [6, 6, 5, 5]
    # the training config cannot close its fence
    assert "```\n" + EVIL.split("\n")[0] not in text


@pytest.mark.parametrize("value,expected", [
    ("rt-sentiment", "rt-sentiment"),
    ("a b_c.d", "a b_c.d"),
    ("<b>", "`<b>`"),
    ("x`y", "``x`y``"),
    ("`x", "`` `x ``"),
    ("a\nb", "`a b`"),
    ("https://e.example", "`https://e.example`"),
    ("a@b.example", "`a@b.example`"),
    (None, "—"),
])
def test_md_text(value: Any, expected: str) -> None:
    assert md_text(value) == expected


def test_md_code_escapes_pipes_only_in_cells() -> None:
    assert md_code("a|b") == "`a|b`" and md_code("a|b", cell=True) == "`a\\|b`"


def test_image_adapter_usage_loads_the_cnn_not_a_transformers_model() -> None:
    card = pinned_card()
    card["base"] = {**card["base"], "architecture": "AdapterhubDigitsCNN", "name": "d"}
    card["task"] = "digits"
    text = str(build_model_card(card, repo_id="alice/digits")).split("## Use it")[1]
    assert "from adapterhub.bases.cnn import load_cnn" in text and "model = load_cnn(" in text
    assert "AutoModel" not in text and "PeftModel" not in text and "predict" not in text
    # a text classifier's card keeps its transformers + PEFT snippets
    text = str(build_model_card(pinned_card(), repo_id="alice/rt")).split("## Use it")[1]
    assert "AutoModel.from_pretrained" in text and "PeftModel" in text and "load_cnn" not in text


_METRIC_KEYS = st.sampled_from(["test_accuracy", "validation_accuracy", "test_f1", "rougeL", "accuracy",
                                "sms-spam/test_accuracy", "t.x/validation_f1", "test_n", "validation_n",
                                "deployment:prod/test_accuracy", "steps"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task=st.one_of(st.none(), st.sampled_from(["rt-sentiment", "a.b_c", "x y"]), st.text(max_size=12)),
       kind=st.sampled_from(["expert", "merge", "unlearning", EVIL]),
       metrics=st.dictionaries(st.one_of(_METRIC_KEYS, st.text(max_size=10)),
                               st.one_of(st.floats(allow_nan=True), st.integers(-10**6, 10**6)), max_size=6),
       hub_id=st.sampled_from([None, "sentence-transformers/all-MiniLM-L6-v2", "javascript:alert(1)"]),
       parents=st.lists(st.sampled_from(["alice/rt", "bob/spam", "not a repo"]), max_size=3))
def test_model_card_text_is_what_model_card_round_trips_to(task: Any, kind: str, metrics: dict[str, Any],
                                                           hub_id: Any, parents: list[str]) -> None:
    """Push writes ``model_card_text`` without huggingface_hub's ModelCard round trip (parse the front matter,
    dump it again): the bytes must be the same as ``str(ModelCard(...))`` for any card a catalog can hold."""
    from huggingface_hub import ModelCard

    card = pinned_card()
    card.update(task=task, kind=kind, metrics=metrics)
    card["base"]["hub_id"] = hub_id
    card["lineage"] = [{"relation": "merged_from", "weight": 0.5, "params": {"method": "ties"},
                        "parent": {"name": p, "version": 1, "hub": {"repo": p, "tag": "v1"}}} for p in parents]
    text = model_card_text(card, repo_id="alice/rt")
    assert str(ModelCard(text)) == text == str(build_model_card(card, repo_id="alice/rt"))
