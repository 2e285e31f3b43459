"""In-memory and on-disk exact apply/revert (adapterhub.apply.patching, adapterhub.apply.disk)."""
from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file, save_file

from adapterhub.apply.disk import DiskTransaction, SafetensorsFile, decode_undo, encode_undo, read_wal, recover_wal
from adapterhub.apply.patching import applied, apply_adapter, patch_flat, revert, revert_all, state_fingerprint
from adapterhub.errors import BaseModelError, DeploymentError
from adapterhub.format import SparseAdapter, SparseParam

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = {"a.weight": (16, 12), "b.weight": (9, 7), "c.bias": (11,)}


def base_state(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in SHAPES.items()}


def rand_adapter(seed, density=0.4, vdtype=torch.float32, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    params = {}
    for n, s in shapes.items():
        mask = torch.rand(s, generator=g) < density
        params[n] = SparseParam.from_mask((torch.randn(s, generator=g) * 0.1).to(vdtype), mask)
    return SparseAdapter(params)


def clone(sd):
    return {k: v.clone() for k, v in sd.items()}


def test_patch_flat_rounds_once_in_fp32():
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    v = torch.tensor([0.00390625, 0.5], dtype=torch.float32)
    orig = patch_flat(w, torch.tensor([0, 2]), v, scale=1.0)
    assert orig.tolist() == [1.0, 3.0]
    want = (torch.tensor([1.0, 3.0]) + v).to(torch.bfloat16)
    assert torch.equal(w[[0, 2]], want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_matches_dense_formula_and_revert_is_exact(dtype):
    sd = base_state(dtype)
    ref = clone(sd)
    a = rand_adapter(1)
    fp0 = state_fingerprint(sd)
    rec = apply_adapter(sd, a, scale=0.5)
    for n, p in a.params.items():
        dense = (ref[n].float() + 0.5 * p.to_dense(torch.float32))
        want = torch.where(p.mask(), dense.to(dtype), ref[n])
        assert torch.equal(sd[n], want), n
    assert state_fingerprint(sd) != fp0
    revert(sd, rec)
    assert state_fingerprint(sd) == fp0
    for n in sd:
        assert torch.equal(sd[n], ref[n])


def test_module_apply_with_prefix_names_and_context_manager():
    lin = torch.nn.Sequential(torch.nn.Linear(12, 16))
    names = {"0.weight": (16, 12)}
    a = rand_adapter(3, shapes={"model.0.weight": (16, 12)})
    before = state_fingerprint(lin)
    x = torch.randn(2, 12)
    y0 = lin(x)
    w0, b0 = lin[0].weight.detach().clone(), lin[0].bias.detach().clone()
    delta = a.params["model.0.weight"].to_dense(torch.float32)
    with applied(lin, a) as recs:
        # the adapter's "model.0.weight" landed on the module's "0.weight" (prefix stripped), and only there
        assert {e.name: tuple(lin.state_dict()[e.name].shape) for r in recs for e in r.entries} == names
        assert torch.equal(recs[0].entries[0].indices, a.params["model.0.weight"].flat()[0])
        # oracle: the layer computes x (W0 + ΔW)^T + b with ΔW densified by hand
        assert torch.equal(lin[0].weight.detach(), w0 + delta)
        assert torch.allclose(lin(x), x @ (w0 + delta).T + b0, atol=1e-6)
        assert not torch.equal(lin(x), y0)
    assert state_fingerprint(lin) == before
    assert torch.equal(lin(x), y0)
    with pytest.raises(RuntimeError):
        with applied(lin, a):
            raise RuntimeError("boom")
    assert state_fingerprint(lin) == before


def test_apply_refuses_unknown_and_wrong_shape_without_changes():
    sd = base_state(torch.float32)
    fp = state_fingerprint(sd)
    bad = SparseAdapter({"a.weight": SparseParam.from_flat((16, 12), torch.tensor([0]), torch.tensor([1.0])),
                         "zzz": SparseParam.from_flat((3,), torch.tensor([0]), torch.tensor([1.0]))})
    with pytest.raises(BaseModelError, match="zzz"):
        apply_adapter(sd, bad)
    wrong = SparseAdapter({"a.weight": SparseParam.from_flat((12, 16), torch.tensor([0]), torch.tensor([1.0]))})
    with pytest.raises(BaseModelError, match="shape"):
        apply_adapter(sd, wrong)
    assert state_fingerprint(sd) == fp


def test_state_fingerprint_equals_folder_fingerprint(tmp_path):
    from adapterhub.bases.sources import fingerprint_folder

    sd = base_state(torch.bfloat16)
    save_file(sd, tmp_path / "model.safetensors")
    assert state_fingerprint(sd) == fingerprint_folder(tmp_path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(DTYPES),
       ops=st.lists(st.tuples(st.sampled_from(["apply", "revert", "revert_at"]), st.integers(0, 4),
                              st.sampled_from([1.0, 0.5, -2.0, 3.0])), min_size=1, max_size=12))
def test_property_stack_equals_remaining_stack_applied_to_base(dtype, ops):
    """Random applies and (possibly non-top) reverts with overlapping masks: the weights always equal
    the base with the remaining stack applied; reverting everything gives the base bytes."""
    adapters = [rand_adapter(10 + i, density=0.5, vdtype=[torch.float32, torch.bfloat16][i % 2]) for i in range(5)]
    base = base_state(dtype, seed=7)
    sd = clone(base)
    stack: list[tuple[int, float]] = []
    recs = []
    for op, i, scale in ops:
        if op == "apply":
            recs.append(apply_adapter(sd, adapters[i], scale))
            stack.append((i, scale))
        elif stack:
            pos = len(stack) - 1 if op == "revert" else i % len(stack)
            for r in reversed(recs[pos:]):
                revert(sd, r)
            above = stack[pos + 1:]
            del stack[pos:], recs[pos:]
            for j, s in above:
                recs.append(apply_adapter(sd, adapters[j], s))
                stack.append((j, s))
        ref = clone(base)
        for j, s in stack:
            apply_adapter(ref, adapters[j], s)
        assert state_fingerprint(sd) == state_fingerprint(ref)
    revert_all(sd, recs)
    assert state_fingerprint(sd) == state_fingerprint(base)


# -- on disk ---------------------------------------------------------------------------------------


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("dtype", DTYPES)
def test_disk_transaction_patches_in_place_and_matches_memory(tmp_path, dtype):
    sd = base_state(dtype)
    f = tmp_path / "model.safetensors"
    save_file(sd, f)
    base_sha = _sha(f)
    size = f.stat().st_size
    a = rand_adapter(5)
    mem = clone(sd)
    apply_adapter(mem, a, 0.25)
    wal = tmp_path / "wal.safetensors"
    with SafetensorsFile(f) as st_file:
        with DiskTransaction(st_file, wal, {"op_id": "x"}, {n: [p.indices] for n, p in a.params.items()}) as tx:
            assert read_wal(wal) == {"op_id": "x", "names": sorted(a.params)}  # written before any weight byte
            ents = tx.apply(a.params, 0.25)
        assert not wal.exists()  # left normally: committed, WAL removed
    assert f.stat().st_size == size
    disk = load_file(f)
    for n in sd:
        assert torch.equal(disk[n], mem[n])
    # revert with the returned originals, through a second transaction
    with SafetensorsFile(f) as st_file:
        with DiskTransaction(st_file, wal, {"op_id": "y"}, {e.name: [e.indices] for e in ents}) as tx:
            tx.restore(ents)
    assert _sha(f) == base_sha and not wal.exists()


def test_disk_transaction_rolls_back_on_an_error_before_commit(tmp_path):
    sd = base_state(torch.bfloat16)
    f = tmp_path / "model.safetensors"
    save_file(sd, f)
    base_sha = _sha(f)
    a = rand_adapter(7)
    wal = tmp_path / "wal.safetensors"
    with SafetensorsFile(f) as st_file:
        with pytest.raises(RuntimeError, match="disk trouble"):
            with DiskTransaction(st_file, wal, {"op_id": "r"}, {n: [p.indices] for n, p in a.params.items()}) as tx:
                tx.apply(a.params, 1.0)
                raise RuntimeError("disk trouble")
    assert _sha(f) == base_sha and not wal.exists()  # the saved bytes went back at once


def test_disk_transaction_keeps_the_wal_after_commit_or_on_a_crash(tmp_path):
    """After commit() the caller's record decides, so an error leaves the WAL; a BaseException that is
    not an Exception (a simulated crash, KeyboardInterrupt) leaves it at any point, as a SIGKILL would."""

    class Crash(BaseException):
        pass

    sd = base_state(torch.float32)
    f = tmp_path / "model.safetensors"
    save_file(sd, f)
    base_sha = _sha(f)
    a = rand_adapter(8)
    wal = tmp_path / "wal.safetensors"
    touched = {n: [p.indices] for n, p in a.params.items()}
    for exc, committed in ((RuntimeError("catalog down"), True), (Crash(), False), (Crash(), True)):
        with SafetensorsFile(f) as st_file:
            with pytest.raises(type(exc)):
                with DiskTransaction(st_file, wal, {"op_id": "c"}, touched) as tx:
                    tx.apply(a.params, 1.0)
                    if committed:
                        tx.commit()
                    raise exc
        assert wal.exists() and _sha(f) != base_sha
        with SafetensorsFile(f) as st_file:
            assert recover_wal(st_file, wal)
        assert _sha(f) == base_sha and not wal.exists()


def test_recover_wal_restores_a_half_patched_file(tmp_path):
    sd = base_state(torch.float16)
    f = tmp_path / "model.safetensors"
    save_file(sd, f)
    base_sha = _sha(f)
    a = rand_adapter(6)
    wal = tmp_path / "wal.safetensors"

    class Crash(BaseException):
        pass

    half = dict(list(sorted(a.params.items()))[:2])
    with SafetensorsFile(f) as st_file, pytest.raises(Crash):
        with DiskTransaction(st_file, wal, {"op_id": "z"}, {n: [p.indices] for n, p in a.params.items()}) as tx:
            tx.apply(half, 1.0)
            st_file.sync()
            raise Crash  # dies half-way: the WAL stays
    assert _sha(f) != base_sha
    assert recover_wal(SafetensorsFile(f), wal)
    assert _sha(f) == base_sha and not wal.exists()
    assert not recover_wal(SafetensorsFile(f), wal)


def test_corrupt_files_are_refused(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file(base_state(torch.float32), f)
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(DeploymentError, match="truncated or corrupt"):
        SafetensorsFile(f)
    f.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(DeploymentError, match="corrupt"):
        SafetensorsFile(f)
    with pytest.raises(DeploymentError, match="damaged"):
        decode_undo(b"garbage!garbage")
    ents, doc = decode_undo(encode_undo([], {"k": 1}))
    assert ents == [] and doc["k"] == 1

