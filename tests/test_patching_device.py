"""Adapters on tensors off the CPU: indices and values are moved to the device once and kept (issue 19).

The caching is checked on the ``meta`` device (no data, so it runs anywhere); the apply/revert arithmetic
on CUDA — equal bit for bit to the CPU's, and reverted exactly — runs where a GPU is present
(``benchmarks/gpu_check.sh`` runs this file on the device machine).
"""
from __future__ import annotations

import pytest
import torch

from adapterhub.apply.patching import apply_adapter, revert, state_fingerprint
from adapterhub.format import SparseAdapter, SparseParam

SHAPES = {"a.weight": (64, 48), "b.weight": (33, 17), "c.bias": (40,)}


def _adapter(seed: int) -> SparseAdapter:
    g = torch.Generator().manual_seed(seed)
    params = {}
    for n, s in SHAPES.items():
        mask = torch.rand(s, generator=g) < 0.2
        params[n] = SparseParam.from_mask(torch.randn(s, generator=g) * 0.05, mask)
    return SparseAdapter(params)


def test_flat_on_cpu_is_flat_itself():
    p = _adapter(0).params["a.weight"]
    idx, vals = p.flat_on("cpu")
    assert idx is p.indices and vals is p.values
    assert p._placed == {}


def test_flat_on_a_device_moves_once_and_follows_new_tensors():
    p = _adapter(0).params["a.weight"]
    i1, v1 = p.flat_on("meta")
    i2, v2 = p.flat_on(torch.device("meta"))
    assert i1.device.type == "meta" and v1.device.type == "meta"
    assert i1 is i2 and v1 is v2  # kept, not moved again
    assert tuple(i1.shape) == tuple(p.indices.shape) and i1.dtype == torch.int64
    p.values = p.values * 2  # a new values tensor: the kept copy is stale
    i3, v3 = p.flat_on("meta")
    assert v3 is not v1 and i3 is not i1
    assert p.flat_on("meta")[1] is v3


def test_block_layout_flat_on_matches_flat():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(4, 3, generator=g) < 0.5
    p = SparseParam.from_block_mask(torch.randn(16, 12, generator=g), mask, 4)
    idx, vals = p.flat_on("meta")
    ref_idx, _ = p.flat()
    assert tuple(idx.shape) == tuple(ref_idx.shape)


def _state(dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {n: torch.randn(s, generator=g).to(dtype).to(device) for n, s in SHAPES.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_apply_equals_cpu_bit_for_bit_and_reverts_exactly(dtype):
    a = _adapter(1)
    cpu, gpu = _state(dtype, "cpu"), _state(dtype, "cuda")
    fp0 = state_fingerprint(gpu)
    assert fp0 == state_fingerprint(cpu)
    rc, rg = apply_adapter(cpu, a, 0.7), apply_adapter(gpu, a, 0.7)
    assert state_fingerprint(gpu) == state_fingerprint(cpu) != fp0
    placed = {n: p._placed["cuda:0"][2] for n, p in a.params.items()}
    revert(gpu, rg)
    revert(cpu, rc)
    assert state_fingerprint(gpu) == fp0 == state_fingerprint(cpu)
    rg2 = apply_adapter(gpu, a, 0.7)  # the second apply reuses the indices already on the GPU
    assert all(e.indices is placed[e.name] for e in rg2.entries)
    revert(gpu, rg2)
    assert state_fingerprint(gpu) == fp0
