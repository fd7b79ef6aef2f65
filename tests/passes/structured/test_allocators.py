"""Allocators on hand-made unit sets: NIRVANA's two pools, CFSP's block sigmoid, rounding up."""

from __future__ import annotations

import math

import pytest
import torch

from slimc.passes.structured import allocators as al


def sets(kind: str, layers: int, size: int, cost: int, floor: int = 1, seed: int = 0) -> list[al.UnitSet]:
    g = torch.Generator().manual_seed(seed)
    return [al.UnitSet(i, kind, torch.rand(size, generator=g, dtype=torch.float64), cost, floor) for i in range(layers)]


def kept_cost(masks, unit_sets) -> int:
    return sum(int(m.sum()) * s.cost for m, s in zip(masks, unit_sets))


def test_two_pools_removes_gamma_times_the_attention_fraction():
    attn = sets("attn", 4, 8, cost=100)  # A = 3200
    mlp = sets("mlp", 4, 200, cost=3, seed=1)  # M = 2400
    a, m = al.two_pools(attn, mlp, sparsity=0.3, gamma=2.0)
    f_a = 0.3 * (3200 + 2400) / (3200 + 2.0 * 2400)  # 0.21: the attention's removal fraction by the formula
    assert abs((1 - kept_cost(a, attn) / 3200) - f_a) <= 100 / 3200 / 2 + 1e-9  # within half a unit
    assert abs((1 - kept_cost(m, mlp) / 2400) - 2.0 * f_a) <= 3 / 2400 / 2 + 1e-9
    # global pools: the kept attention units are the highest scores over all layers
    scores = torch.cat([s.scores for s in attn])
    keep = torch.cat(a)
    assert float(scores[keep].min()) > float(scores[~keep].max())


def test_two_pools_caps_the_mlp_share_and_keeps_floors():
    attn = sets("attn", 2, 4, cost=10)
    mlp = sets("mlp", 2, 10, cost=1)
    a, m = al.two_pools(attn, mlp, sparsity=0.6, gamma=10.0)  # gamma * f_a > 1: the MLP keeps only its floors
    assert [int(x.sum()) for x in m] == [1, 1]
    assert all(int(x.sum()) >= 1 for x in a)
    with pytest.raises(ValueError):
        al.two_pools(attn, mlp, sparsity=0.5, gamma=0.0)


def test_block_keep_ratios_hand_example():
    imp = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    r = al.block_keep_ratios(imp, keep=0.5, temperature=0.1, slope=1.0, max_keep=0.95)
    s = torch.sigmoid(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(r, 0.5 * s / s.mean())
    assert math.isclose(float(r.mean()), 0.5, rel_tol=1e-12)
    # a cap: the most important layer would keep > 0.95; it is capped, the others take the excess
    r = al.block_keep_ratios(imp, keep=0.8, temperature=0.05, max_keep=0.95)
    assert float(r.max()) <= 0.95 + 1e-12 and math.isclose(float(r.mean()), 0.8, rel_tol=1e-9)
    assert r[0] < r[1] < r[2] or r[2] == pytest.approx(0.95)


def test_block_sigmoid_hits_the_target_and_ranks_within_layers():
    mlp = sets("mlp", 3, 100, cost=3)
    imp = torch.tensor([0.05, 0.3, 0.1], dtype=torch.float64)
    masks = al.block_sigmoid(mlp, imp, sparsity=0.5, temperature=0.1)
    assert abs(kept_cost(masks, mlp) - 0.5 * 900) <= 3
    counts = [int(m.sum()) for m in masks]
    assert counts[1] > counts[2] > counts[0]  # the layer that changes the stream most keeps most
    for m, s in zip(masks, mlp):
        assert torch.equal(m, al.top_k_mask(s.scores, int(m.sum())))


def test_round_up_keep():
    scores = torch.arange(20, dtype=torch.float64)
    m = al.top_k_mask(scores, 9)
    (r,) = al.round_up_keep([m], [scores], 8)
    assert int(r.sum()) == 16 and r[m].all()  # rounded up, the old choice kept
    (full,) = al.round_up_keep([al.top_k_mask(scores, 19)], [scores], 8)
    assert int(full.sum()) == 20  # never more than all
    assert torch.equal(al.round_up_keep([m], [scores], 1)[0], m)
