"""Criteria against hand-computed values: CFSP's fine score (and the released code's collapse), L1 saliency, Wanda-sp."""

from __future__ import annotations

import torch

from slimc.compiler.groups import Group, Role, Slice, block_index
from slimc.passes.structured import criteria as cr


def neuron_group(inter: int) -> Group:
    idx = block_index(inter, 1)
    return Group("mlp", inter, [Slice("gate", 0, idx), Slice("up", 0, idx), Slice("down", 1, idx)], Role.MLP_NEURON, 0)


def test_cfsp_score_by_hand():
    gate = torch.tensor([[1.0, -1.0], [2.0, 0.0], [1.0, 1.0]])  # [I=3, d=2]
    up = torch.tensor([[0.0, 2.0], [1.0, 1.0], [3.0, -1.0]])
    down = torch.tensor([[1.0, 2.0, 1.0], [0.0, -1.0, 3.0]])  # [d=2, I=3]
    a = torch.tensor([1.0, 2.0, 0.5])
    tensors = {"gate": gate, "up": up, "down": down}
    got = cr.cfsp_scores(neuron_group(3), tensors, "down", a, b=1.0, c=1.0)
    # by hand: normalise each tensor's |W| over the 3 neurons per hidden index i, mean over i, sum, times a
    g = gate.abs() / gate.abs().sum(0)
    u = up.abs() / up.abs().sum(0)
    dw = (down.abs() * a).T  # [I, d]: |W_d[i, j]| a_j
    d = dw / dw.sum(0)
    expected = (g.mean(1) + u.mean(1) + d.mean(1)) * a
    torch.testing.assert_close(got, expected.double())


def test_cfsp_faithful_collapses_to_the_activation_norm():
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(*s, generator=g) for n, s in (("gate", (5, 4)), ("up", (5, 4)), ("down", (4, 5)))}
    a = torch.rand(5, generator=g) + 0.1
    got = cr.cfsp_scores(neuron_group(5), tensors, "down", a, b=1.0, c=1.0, faithful=True)
    torch.testing.assert_close(got, (3 / 4) * a.double())  # (3/d) a^c: the released code's score
    # the default normalisation is not a function of a alone
    assert not torch.allclose(cr.cfsp_scores(neuron_group(5), tensors, "down", a), got)


def test_group_l1_sums_every_weight_a_unit_owns():
    sal = {"gate": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "up": torch.ones(2, 2), "down": torch.tensor([[5.0, 6.0], [7.0, 8.0]])}
    torch.testing.assert_close(cr.group_l1(neuron_group(2), sal), torch.tensor([3 + 2 + 12, 7 + 2 + 14], dtype=torch.float64))


def test_wanda_sp_channel_scores():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    sq = torch.tensor([4.0, 9.0])
    torch.testing.assert_close(cr.wanda_sp_channel_scores(w, sq), torch.tensor([2.0 * 2, 1.0 * 3], dtype=torch.float64))


def test_every_registered_criterion_names_its_needs():
    assert set(cr.CRITERIA) >= {"flap-ifv", "flap-wifv", "flap-wifn", "wanda-sp", "cfsp", "saliency", "taylor", "magnitude"}
    for c in cr.CRITERIA.values():
        assert all(n in ("inputs", "gram") or n.startswith("saliency:") for n in c.needs)


def test_obs_cost_is_the_error_lsq_leaves():
    """Removing a unit and refitting the rest by least squares leaves exactly the OBS cost (no damping)."""
    from slimc.passes.structured.compensation import lsq_compensation

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / x.shape[0]
    index = torch.tensor([[0, 1], [2, 3], [4, 5]])
    costs = cr.obs_costs(w, cov, index, damp=0.0)
    for u in range(3):
        removed = index[u]
        kept = torch.tensor([j for j in range(6) if j not in removed.tolist()])
        w_k, b = lsq_compensation(w, mu, cov, kept, removed, ridge=1e-12)
        err = ((x @ w.T) - (x[:, kept] @ w_k.T + b)).pow(2).sum(1).mean()
        torch.testing.assert_close(costs[u], err, rtol=1e-6, atol=1e-9)


def test_obs_single_channel_units_use_the_diagonal():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 4, generator=g, dtype=torch.float64)
    cov = x.T @ x / 500
    w = torch.randn(2, 4, generator=g, dtype=torch.float64)
    single = cr.obs_costs(w, cov, torch.arange(4)[:, None], damp=0.0)
    expected = (w ** 2).sum(0) / torch.diagonal(torch.linalg.inv(cov))
    torch.testing.assert_close(single, expected)
