"""The image base kind (issue 14): adapterhub's own digits CNN, built deterministically, loaded strictly, and
trained, registered, deployed, evaluated and reverted through the same paths as text bases."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub.bases import cnn
from adapterhub.bases.sources import fingerprint_folder, resolve_source
from adapterhub.errors import BaseModelError, DataError, TrainingError
from adapterhub.fsutil import DONE_MARKER, sha256_file
from adapterhub.training import TrainConfig
from adapterhub.training.loop import train_adapter
from adapterhub.training.model import (
    DEFAULT_TARGETS,
    Batcher,
    LinearHead,
    SparseDeltaModel,
    find_targets,
    load_backbone,
    model_kind,
    tokenizer_for,
)
from trust_util import run_cli

CFG = TrainConfig(density=0.1, steps=40, lr=1e-2, batch_size=32, device="cpu", seed=0)


@pytest.fixture(scope="module")
def digits():
    from adapterhub.data import load_task

    return load_task("digits")


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory) -> Path:
    return cnn.build_digits_cnn(tmp_path_factory.mktemp("cnn") / "digits-cnn")


@pytest.fixture(scope="module")
def trained(cnn_dir, digits):
    return train_adapter(cnn_dir, digits, CFG, task_name="digits")


# ---------------------------------------------------------------------------- the folder

def test_build_is_deterministic_and_the_builtin_source_is_seed_0(tmp_path, cnn_dir):
    again = cnn.build_digits_cnn(tmp_path / "again")
    for f in ("config.json", "model.safetensors"):
        assert sha256_file(again / f) == sha256_file(cnn_dir / f)
    other = cnn.build_digits_cnn(tmp_path / "seed1", seed=1)
    assert sha256_file(other / "model.safetensors") != sha256_file(cnn_dir / "model.safetensors")
    built = resolve_source("digits-cnn", tmp_path / "cache")
    assert built == tmp_path / "cache" / "digits-cnn"
    assert fingerprint_folder(built) == fingerprint_folder(cnn_dir)
    assert resolve_source("builtin:digits-cnn", tmp_path / "cache") == built  # reused, not rebuilt
    (built / DONE_MARKER).unlink()  # a build that crashed before its marker is redone
    (built / "model.safetensors").write_bytes(b"partial")
    assert fingerprint_folder(resolve_source("cnn-digits", tmp_path / "cache")) == fingerprint_folder(cnn_dir)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["digits-cnn"]  # no temporary folder left
    cfg = json.loads((cnn_dir / "config.json").read_text())
    assert cfg == {"architectures": ["AdapterhubDigitsCNN"], "model_type": "adapterhub-digits-cnn",
                   "num_channels": 1, "image_size": 8, "conv_channels": [16, 32, 32], "hidden_size": 64}
    sd = load_file(cnn_dir / "model.safetensors")
    assert sorted(sd) == ["conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight", "conv3.bias", "conv3.weight",
                          "fc.bias", "fc.weight"]
    assert tuple(sd["fc.weight"].shape) == (64, 32 * 2 * 2) and all(v.dtype == torch.float32 for v in sd.values())
    bound = (6 / 9) ** 0.5  # He-uniform on conv1 (fan_in 1*3*3)
    assert 0 < sd["conv1.weight"].abs().max() <= bound and not sd["conv1.bias"].any()


def test_load_gives_the_written_tensors_and_features(cnn_dir):
    m = cnn.load_cnn(cnn_dir)
    sd = load_file(cnn_dir / "model.safetensors")
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert model_kind(cnn_dir) == "image"
    bb = load_backbone(cnn_dir, "image", torch.float32, torch.device("cpu"))
    assert not any(p.requires_grad for p in bb.parameters())
    x = cnn.decode_pixels(["0 " * 63 + "16"])
    feats = bb(x)
    assert feats.shape == (1, 64) and feats.dtype == torch.float32 and (feats >= 0).all()
    # the forward pass is the documented one (conv, relu, conv, relu, pool, conv, relu, fc, relu), on copies of
    # the file's tensors in memory torch allocated, as the model's parameters are: load_file's tensors may start
    # at any 8-byte offset, and on AVX-512 CPUs a matrix product's sums round differently when an operand is not
    # 16-byte aligned (the same values: 1 ulp apart)
    sd = {k: v.clone() for k, v in sd.items()}
    F = torch.nn.functional
    h = F.relu(F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], padding=1))
    h = F.max_pool2d(F.relu(F.conv2d(h, sd["conv2.weight"], sd["conv2.bias"], padding=1)), 2)
    h = F.relu(F.conv2d(h, sd["conv3.weight"], sd["conv3.bias"]))
    assert torch.equal(feats, F.relu(F.linear(h.flatten(1), sd["fc.weight"], sd["fc.bias"])))
    assert cnn.load_cnn(cnn_dir, dtype=torch.bfloat16).fc.weight.dtype == torch.bfloat16


def _with_config(src: Path, dest: Path, cfg: object) -> Path:
    dest.mkdir()
    (dest / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (dest / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return dest


GOOD = {"architectures": ["AdapterhubDigitsCNN"], "model_type": "adapterhub-digits-cnn", "num_channels": 1,
        "image_size": 8, "conv_channels": [16, 32, 32], "hidden_size": 64}


@pytest.mark.parametrize(("change", "message"), [
    ({"architectures": ["BertModel"]}, "architectures must be"),
    ({"architectures": ["AdapterhubDigitsCNN", "X"]}, "architectures must be"),
    ({"model_type": "bert"}, "model_type must be"),
    ({"hidden_size": 10**12}, "hidden_size must be an integer in [1, 4096]"),
    ({"hidden_size": 0}, "hidden_size must be"),
    ({"hidden_size": "64"}, "hidden_size must be"),
    ({"hidden_size": 64.0}, "hidden_size must be"),
    ({"hidden_size": True}, "hidden_size must be"),
    ({"conv_channels": [16, 32, 10**6]}, "conv_channels must be an integer"),
    ({"conv_channels": [16, 32]}, "conv_channels must be a list of 3"),
    ({"conv_channels": "16,32,32"}, "conv_channels must be a list of 3"),
    ({"image_size": 64}, "image_size must be"),
    ({"num_channels": 3}, "num_channels must be"),
    ({"auto_map": {"AutoModel": "evil.Model"}}, "unknown field 'auto_map'"),
    ({"hidden_size": None}, "hidden_size must be"),
])
def test_hostile_config_is_one_line_error(tmp_path, cnn_dir, change, message):
    folder = _with_config(cnn_dir, tmp_path / "bad", {**GOOD, **change})
    with pytest.raises(BaseModelError) as e:
        cnn.load_cnn(folder)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_hostile_cnn_base_fails_train_and_eval_in_one_line(ws, tmp_path, cnn_dir, trained):
    from adapterhub.evaluation import evaluate
    from adapterhub.training.loop import train

    folder = _with_config(cnn_dir, tmp_path / "bad", {**GOOD, "hidden_size": 10**12})
    ws.add_base("bad", str(folder))  # registering reads only the header and the architecture name
    with pytest.raises(BaseModelError, match=r"hidden_size must be an integer in \[1, 4096\], got 1000000000000"):
        train(ws, base="bad", task="digits", config=CFG)
    assert ws.list_versions() == []
    ws.add_base("cnn", str(cnn_dir))
    info = ws.register(trained.adapter, name="digits-cs", task="digits", base="cnn")
    with pytest.raises(BaseModelError, match="hidden_size must be"):
        evaluate(ws, info.ref, split="test", model_dir=folder, device="cpu")
    (folder / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(TrainingError, match="config.json: JSON nested too deeply"):
        model_kind(folder)


@pytest.mark.parametrize("raw", ["[1, 2]", "{", "\"x\"", "[" * 100000 + "]" * 100000, "{\"hidden_size\": 1" + "0" * 5000 + "}"])
def test_malformed_config_json_is_one_line_error(tmp_path, cnn_dir, raw):
    folder = _with_config(cnn_dir, tmp_path / "bad", raw)
    with pytest.raises(BaseModelError) as e:
        cnn.load_cnn(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda sd: {**sd, "extra.weight": torch.zeros(2)}, "unexpected tensor 'extra.weight'"),
    (lambda sd: {k: v for k, v in sd.items() if k != "fc.bias"}, "missing tensor fc.bias"),
    (lambda sd: {**sd, "fc.weight": torch.zeros(64, 127)}, "fc.weight has shape [64, 127]"),
    (lambda sd: {**sd, "fc.bias": torch.zeros(64, dtype=torch.int32)}, "several dtypes"),
    (lambda sd: {k: v.to(torch.int64) for k, v in sd.items()}, "floating dtype is required"),
])
def test_hostile_weights_are_one_line_error(tmp_path, cnn_dir, edit, message):
    folder = _with_config(cnn_dir, tmp_path / "bad", GOOD)
    save_file(edit(load_file(cnn_dir / "model.safetensors")), folder / "model.safetensors")
    with pytest.raises(BaseModelError) as e:
        cnn.load_cnn(folder)
    assert message in str(e.value) and "\n" not in str(e.value)
    (folder / "model.safetensors").write_bytes(b"\xff" * 7)
    with pytest.raises(BaseModelError):
        cnn.load_cnn(folder)


# ---------------------------------------------------------------------------- pixels as text

def test_pixel_text_round_trip_and_trigger(digits):
    text = digits.train[0][0]
    x = cnn.decode_pixels([text])
    assert x.shape == (1, 1, 8, 8) and x.dtype == torch.float32 and float(x.max()) <= 1.0
    assert cnn.encode_pixels((x[0, 0] * 16).round().to(torch.int64)) == text
    assert cnn.encode_pixels([[0] * 8] * 8) == " ".join(["0"] * 64)
    trig = cnn.add_trigger(text)
    vals, before = [int(v) for v in trig.split()], [int(v) for v in text.split()]
    assert [i for i in range(64) if vals[i] != before[i]] == [i for i in (54, 55, 62, 63) if before[i] != 16]
    assert [vals[i] for i in (54, 55, 62, 63)] == [16] * 4 and cnn.add_trigger(trig) == trig
    assert cnn.decode_pixels([trig])[0, 0, 6:, 6:].eq(1.0).all()


@pytest.mark.parametrize("bad", ["1 2 3", " ".join(["17"] * 64), " ".join(["-1"] * 64), " ".join(["1.5"] * 64),
                                 " ".join(["٣"] * 64), "0  " + " ".join(["0"] * 62)])
def test_malformed_pixel_rows_are_data_errors(bad):
    with pytest.raises(DataError) as e:
        cnn.decode_pixels(["0 " * 63 + "0", bad])
    assert "row 1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError):
        cnn.add_trigger(bad)


@pytest.mark.parametrize("bad", [[0] * 63, [17] + [0] * 63, [float("nan")] + [0] * 63, [True] + [0] * 63])
def test_encode_refuses_what_is_not_an_image(bad):
    with pytest.raises(DataError):
        cnn.encode_pixels(bad)


# ---------------------------------------------------------------------------- training

def test_targets_head_and_batches_of_the_image_kind(cnn_dir, digits):
    bb = load_backbone(cnn_dir, "image", torch.float32, torch.device("cpu"))
    shapes = {k: tuple(v.shape) for k, v in load_file(cnn_dir / "model.safetensors").items()}
    targets = find_targets(bb, DEFAULT_TARGETS["image"], shapes)
    assert targets == {k: k for k in ("conv1.weight", "conv2.weight", "conv3.weight", "fc.weight")}
    sdm = SparseDeltaModel(bb, "image", targets, 10, torch.device("cpu"), autocast=False)
    assert isinstance(sdm.head, LinearHead) and tuple(sdm.head.linear.weight.shape) == (10, 64)
    assert tokenizer_for(cnn_dir, "image") is None
    b = Batcher(None, "image", digits.labels, 128).batch(digits.train[:5], torch.device("cpu"))
    assert set(b) == {"pixel_values", "labels"} and b["pixel_values"].shape == (5, 1, 8, 8)
    loss, logits = sdm.forward(b)
    assert logits.shape == (5, 10)
    # with a given (weight, bias) head the logits are the same linear map of the features
    head = (sdm.head.linear.weight.detach(), sdm.head.linear.bias.detach())
    assert torch.equal(sdm.outputs({}, b, head=head), logits)
    assert float(loss.detach()) == pytest.approx(float(torch.nn.functional.cross_entropy(logits.detach(), b["labels"])))


def test_sparse_training_on_digits_learns(trained):
    m = trained.metrics
    # measured 0.839 on the 180 validation rows with this seed and config; chance is 0.1
    assert m["validation_n"] == 180 and m["validation_accuracy"] > 0.75
    a = trained.adapter
    assert sorted(a.params) == ["conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"]
    for p in a.params.values():
        assert p.nnz == pytest.approx(0.1 * p.numel, abs=1)
    assert a.card["model_kind"] == "image" and a.card["head"] == {"type": "linear", "pooling": "none", "task": "digits"}
    assert tuple(a.extras["heads.digits.weight"].shape) == (10, 64) and a.card["labels"]["digits"] == list("0123456789")


# ---------------------------------------------------------------------------- catalog, deployment, eval, activate

def test_register_deploy_eval_and_exact_revert(ws, cnn_dir, trained):
    from adapterhub.apply import deployments as dep
    from adapterhub.evaluation import evaluate

    base = ws.add_base("cnn", str(cnn_dir))
    assert base.architecture == "AdapterhubDigitsCNN" and base.num_params == 22304
    info = ws.register(trained.adapter, name="digits-cs", task="digits", base="cnn")
    mem = evaluate(ws, info.ref, split="test", device="cpu")  # base + deltas in memory
    assert mem.n == 180 and mem.accuracy > 0.6
    d = dep.create(ws, "prod", "cnn")
    weights = Path(d.path) / "model.safetensors"
    before = sha256_file(weights)
    assert before == sha256_file(cnn_dir / "model.safetensors")
    dep.apply(ws, "prod", info.ref)
    assert sha256_file(weights) != before
    on_disk = evaluate(ws, info.ref, split="test", model_dir=d.path, device="cpu", deployment="prod")
    assert on_disk.accuracy == mem.accuracy and on_disk.loss == pytest.approx(mem.loss, abs=1e-6)
    # the deployed folder holds exactly base + delta (fp32 add, as training computes W + Δ)
    patched, orig = load_file(weights), load_file(cnn_dir / "model.safetensors")
    for k, p in trained.adapter.params.items():
        assert torch.equal(patched[k], orig[k] + p.to_dense().float())
    assert torch.equal(patched["fc.bias"], orig["fc.bias"])
    dep.revert(ws, "prod")
    assert sha256_file(weights) == before
    assert fingerprint_folder(Path(d.path)) == base.fingerprint


def test_activate_predicts_like_eval_and_reverts(ws, cnn_dir, trained, digits):
    import adapterhub
    from adapterhub.evaluation import evaluate

    ws.add_base("cnn", str(cnn_dir))
    info = ws.register(trained.adapter, name="digits-cs", task="digits", base="cnn")
    oracle = evaluate(ws, info.ref, split="test", device="cpu", record=False)
    model = cnn.load_cnn(cnn_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = digits.test
    with adapterhub.activate(model, info.ref, workspace=ws) as h:
        scores = h.scores([t for t, _ in rows])
        preds = h.predict([t for t, _ in rows])
        assert scores.shape == (180, 10)
        assert sum(p == digits.labels[y] for p, (_, y) in zip(preds, rows, strict=True)) / 180 == oracle.accuracy
        gold = torch.tensor([y for _, y in rows])
        assert float(torch.nn.functional.cross_entropy(scores, gold)) == pytest.approx(oracle.loss, abs=1e-6)
        assert not torch.equal(model.fc.weight, before["fc.weight"])
        with pytest.raises(TrainingError, match="image model"):
            h.classifier()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cli_base_add_and_train_end_to_end(tmp_path):
    home = tmp_path / "home"
    r = run_cli(home, "base", "add", "d", "digits-cnn", "--json")
    assert r.returncode == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["architecture"] == "AdapterhubDigitsCNN" and doc["source"] == "builtin:digits-cnn"
    ref_dir = cnn.build_digits_cnn(tmp_path / "ref")
    assert doc["fingerprint"] == fingerprint_folder(ref_dir)  # same bytes as any other build of seed 0
    r = run_cli(home, "train", "--base", "d", "--task", "digits", "--density", "0.1", "--steps", "40", "--lr", "0.01",
                "--batch-size", "32", "--device", "cpu", "--json")
    assert r.returncode == 0, r.output
    v = json.loads(r.stdout)
    assert v["ref"] == "digits-connection-sensitivity@1" and v["metrics"]["validation_accuracy"] > 0.75


def test_text_rows_on_an_image_base_fail_before_training_and_register_nothing(ws, cnn_dir):
    from adapterhub.training.loop import train

    ws.add_base("cnn", str(cnn_dir))
    with pytest.raises(DataError) as e:
        train(ws, base="cnn", task="sms-spam", config=TrainConfig(steps=2, device="cpu"))
    assert str(e.value).startswith("dataset 'sms-spam' (train split) is not images for an image base: row 0: ")
    assert ws.list_versions() == []
