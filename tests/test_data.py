"""Offline tasks (pinned files, fixed splits, documented counts) and the csv/jsonl loaders."""
from __future__ import annotations

import json

import pytest

from adapterhub.data import tasks as D
from adapterhub.errors import DataError


@pytest.mark.parametrize("name", sorted(D.BUILTIN_TASKS))
def test_builtin_task_matches_documented_rows_and_is_well_formed(name):
    spec = D.get_task(name)
    td = D.load_task(name)
    assert td.counts() == spec.rows
    assert td.labels == list(spec.labels)
    seen_labels = set()
    for split in D.SPLITS:
        for text, label in getattr(td, split):
            assert isinstance(text, str) and text.strip()
            assert 0 <= label < len(td.labels)
            seen_labels.add(label)
    assert seen_labels == set(range(len(td.labels)))
    if name != "digits":  # digit images repeat as text; the others are deduplicated
        train = {t for t, _ in td.train}
        assert not train & {t for t, _ in td.test}
        assert not train & {t for t, _ in td.validation}


def test_splits_are_fixed():
    a, b = D.load_task("trec-coarse"), D.load_task("trec-coarse")
    assert a.fingerprint() == b.fingerprint()
    assert a.train[:3] == b.train[:3]


def test_trec_is_deduplicated():
    td = D.load_task("trec-coarse")
    texts = [t for s in D.SPLITS for t, _ in getattr(td, s)]
    assert len(texts) == len(set(texts)) == 5381


def test_checksum_mismatch_is_refused(monkeypatch):
    spec = D.get_task("sms-spam")
    bad = D.TaskSpec(spec.name, spec.description, (D.DataFile(spec.files[0].package, spec.files[0].relpath, "0" * 64),),
                     spec.labels, spec.rows, spec.reader)
    with pytest.raises(DataError, match="sha256"):
        bad.load()


def test_missing_package_is_a_clear_error():
    f = D.DataFile("no_such_pkg_adapterhub", "x.csv", "0" * 64)
    with pytest.raises(DataError, match="not installed"):
        f.path()


def test_unknown_task():
    with pytest.raises(DataError, match="unknown task 'nope'.*rt-sentiment"):
        D.load_task("nope")


def test_csv_loader_with_columns_and_seeded_split(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("review,stars\n" + "".join(f"text {i},{'good' if i % 2 else 'bad'}\n" for i in range(50)))
    td = D.load_dataset(f"csv:{p}", text_column="review", label_column="stars")
    assert td.labels == ["bad", "good"]
    assert td.counts() == {"train": 40, "validation": 5, "test": 5}
    assert td.fingerprint() == D.load_dataset(f"csv:{p}", text_column="review", label_column="stars").fingerprint()


def test_jsonl_loader_uses_a_split_column_and_given_labels(tmp_path):
    p = tmp_path / "d.jsonl"
    recs = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg", "split": ["train", "validation", "test"][i % 3]}
            for i in range(12)]
    p.write_text("\n".join(json.dumps(r) for r in recs))
    td = D.load_dataset(f"jsonl:{p}", labels=["pos", "neg"])
    assert td.counts() == {"train": 4, "validation": 4, "test": 4}
    assert dict(td.train)["t3"] == 0 and dict(td.train)["t0"] == 1


@pytest.mark.parametrize("content,match", [
    ("text,other\nhello,1\nbye,2\n", "no label column 'label'"),
    ("text,label\n", "has no rows"),
    ("", "has no rows"),
    ("text,label\na,x\nb,x\n", "only one label"),
    ("text,label\na,\nb,y\n", "row 1 has an empty"),
])
def test_bad_csv_is_a_clear_error(tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        D.load_dataset(f"csv:{p}")


def test_labels_unknown_to_the_head_are_refused(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match="not in the expected"):
        D.load_dataset(f"csv:{p}", labels=["x"])


@pytest.mark.parametrize("spec", ["nope", "xml:/tmp/a", "csv:"])
def test_bad_specs(spec):
    with pytest.raises(DataError):
        D.load_dataset(spec)


def test_hf_needs_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="network|datasets"):
        D.load_dataset("hf:imdb")


def test_empty_split_is_reported(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x", "split": "train"}\n{"text": "b", "label": "y", "split": "train"}\n')
    td = D.load_dataset(f"jsonl:{p}")
    with pytest.raises(DataError, match="empty test split"):
        td.split("test")
    with pytest.raises(DataError, match="unknown split"):
        td.split("nope")
