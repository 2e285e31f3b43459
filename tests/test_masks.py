"""Mask registry and top-k selection: budgets, blocks, scope, determinism, errors."""
from __future__ import annotations

import pytest
import torch

from adapterhub.errors import TrainingError
from adapterhub.training import masks as M


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(32, 48, generator=g), "b.weight": torch.randn(64, 16, generator=g),
            "emb.weight": torch.randn(100, 16, generator=g)}


def _inputs(seed=0):
    w = _weights(seed)
    g = torch.Generator().manual_seed(seed)
    deltas = {k: torch.randn(v.shape, generator=g) for k, v in w.items()}
    grads = {k: torch.randn(v.shape, generator=g) for k, v in w.items()}
    return M.MaskInputs(w, torch.Generator().manual_seed(7), deltas=deltas, grads=grads)


@pytest.mark.parametrize("method", sorted(M.MASK_METHODS))
@pytest.mark.parametrize("density", [0.01, 0.05, 0.3, 1.0])
def test_every_method_meets_the_per_layer_budget(method, density):
    scores = M.get_mask_method(method).scores(_inputs())
    sel = M.select(scores, density)
    for k, w in _weights().items():
        idx = sel[k].indices
        assert idx.numel() == M.budget(w.numel(), density)
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx[-1]) < w.numel()


def test_global_scope_meets_the_total_budget_and_follows_scores():
    w = _weights()
    scores = {k: torch.zeros(v.shape) for k, v in w.items()}
    scores["b.weight"] += 1.0  # b wins everything while its budget lasts
    sel = M.select(scores, 0.1, scope="global")
    total = sum(v.numel() for v in w.values())
    assert sum(s.indices.numel() for s in sel.values()) == M.budget(total, 0.1)
    assert sel["b.weight"].indices.numel() == M.budget(total, 0.1)
    assert sel["a.weight"].indices.numel() == 0


def test_block_selection_keeps_whole_tiles_scored_by_their_sum():
    score = torch.zeros(32, 48)
    score[8:16, 40:48] = 1.0  # one 8x8 tile
    score[0, 0] = 0.9  # a single strong element does not beat a tile's sum
    sel = M.select({"w": score}, 1 / 24, granularity="block", block_size=8)  # 24 tiles -> 1
    s = sel["w"]
    assert s.block_indices.tolist() == [1 * 6 + 5]
    m = torch.zeros(32 * 48, dtype=torch.bool)
    m[s.indices] = True
    m = m.reshape(32, 48)
    assert m[8:16, 40:48].all() and int(m.sum()) == 64


def test_block_budget_counts_blocks():
    scores = {k: v for k, v in M.get_mask_method("random").scores(_inputs()).items() if k != "emb.weight"}
    sel = M.select(scores, 0.25, granularity="block", block_size=16)
    for k, s in sel.items():
        nblocks = scores[k].numel() // 256
        assert s.block_indices.numel() == M.budget(nblocks, 0.25)
        assert s.indices.numel() == 256 * s.block_indices.numel()


def test_block_shape_not_divisible_is_a_clear_error():
    with pytest.raises(TrainingError, match="not divisible into 16x16"):
        M.select({"emb.weight": torch.rand(100, 16)}, 0.1, granularity="block", block_size=16)


@pytest.mark.parametrize("density", [0, -0.1, 1.01, float("nan")])
def test_density_outside_the_interval_is_refused(density):
    with pytest.raises(TrainingError, match="density must be in"):
        M.select({"w": torch.rand(4, 4)}, density)


def test_unknown_method_lists_valid_ones_and_duplicates_are_refused():
    with pytest.raises(TrainingError, match="connection-sensitivity"):
        M.get_mask_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        M.register_mask_method(M.RandomMask())


def test_random_masks_come_from_the_seeded_generator_only():
    w = _weights()
    a = M.select(M.RandomMask().scores(M.MaskInputs(w, torch.Generator().manual_seed(3))), 0.1)
    torch.manual_seed(999)  # the global RNG must not matter
    b = M.select(M.RandomMask().scores(M.MaskInputs(w, torch.Generator().manual_seed(3))), 0.1)
    c = M.select(M.RandomMask().scores(M.MaskInputs(w, torch.Generator().manual_seed(4))), 0.1)
    assert all(torch.equal(a[k].indices, b[k].indices) for k in w)
    assert not all(torch.equal(a[k].indices, c[k].indices) for k in w)


def test_magnitude_keeps_the_largest_weights():
    w = torch.tensor([[0.1, -5.0], [3.0, 0.2]])
    sel = M.select(M.MagnitudeMask().scores(M.MaskInputs({"w": w}, torch.Generator())), 0.5)
    assert sel["w"].indices.tolist() == [1, 2]


def test_connection_sensitivity_signed_and_abs():
    w = torch.zeros(1, 4)
    delta = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    grad = torch.tensor([[-3.0, 2.0, 0.5, -0.1]])  # -Ŵ·∇Ŵ = [3, -2, -0.5, 0.1]
    inp = M.MaskInputs({"w": w}, torch.Generator(), deltas={"w": delta}, grads={"w": grad})
    default = M.select(M.ConnectionSensitivityMask().scores(inp), 0.5)["w"].indices.tolist()
    inp.options["score"] = "signed"
    signed = M.select(M.ConnectionSensitivityMask().scores(inp), 0.5)["w"].indices.tolist()
    inp.options["score"] = "abs"
    absolute = M.select(M.ConnectionSensitivityMask().scores(inp), 0.5)["w"].indices.tolist()
    assert signed == [0, 3] and absolute == [0, 1] and default == absolute
    inp.options["score"] = "raw"
    with pytest.raises(TrainingError, match="unknown score mode"):
        M.ConnectionSensitivityMask().scores(inp)


def test_grow_drop_update_keeps_the_count_and_regrows_by_gradient():
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    vals = torch.arange(10, dtype=torch.float32)  # 0 and 1 are the smallest: dropped at 20%
    grad = torch.zeros(20)
    grad[15], grad[17], grad[3] = 5.0, 4.0, 100.0  # 3 is already active: never regrown
    new, keep = M.grow_drop_update(vals, idx, grad, 0.2)
    assert new.tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 15, 17]
    assert keep.tolist() == [True] * 8 + [False, False]
