"""OBSPA maths: OBS structured removal equals least-squares refits; the data-free H matches sampled inputs."""

from __future__ import annotations

import math

import pytest
import torch

from slimc.passes._obspa_math import (
    bn_input_moments,
    channel_costs,
    columns_of_channels,
    dampen,
    downdate,
    greedy_remove,
    hessian_from_moments,
    relu_gaussian_moments,
    removal_cost,
    removal_update,
)


def _layer(n: int, d: int, out: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs, so a refit really moves the kept weights
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    w = torch.randn(out, d, generator=g, dtype=torch.float64)
    return x, w, x.T @ x / n


def _refit(x: torch.Tensor, w: torch.Tensor, keep: torch.Tensor):
    """Direct least-squares refit of the kept columns and its mean squared output error (summed over outputs)."""
    y = x @ w.T
    w_keep = torch.linalg.lstsq(x[:, keep], y).solution.T
    err = float(((y - x[:, keep] @ w_keep.T) ** 2).sum()) / x.shape[0]
    return w_keep, err


def _keep(d: int, removed: list[int]) -> torch.Tensor:
    return torch.tensor([j for j in range(d) if j not in removed], dtype=torch.int64)


def test_obs_update_and_cost_equal_the_least_squares_refit():
    x, w, h = _layer(200, 6, 3, seed=0)
    hinv = torch.linalg.inv(h)
    q = torch.tensor([1, 4])
    new = w + removal_update(w, hinv, q)
    w_keep, err = _refit(x, w, _keep(6, [1, 4]))
    assert torch.allclose(new[:, q], torch.zeros(3, 2, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(new[:, _keep(6, [1, 4])], w_keep, atol=1e-8)
    assert removal_cost(w, hinv, q) == pytest.approx(err, abs=1e-8)


def test_two_column_channel_and_greedy_sequence_equal_the_refit():
    x, w, h = _layer(200, 8, 3, seed=1)
    sets = columns_of_channels(4, 2)
    assert sets.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    hinv = torch.linalg.inv(h)
    # one channel of two columns
    new = w + removal_update(w, hinv, sets[1])
    w_keep, err = _refit(x, w, _keep(8, [2, 3]))
    assert torch.allclose(new[:, _keep(8, [2, 3])], w_keep, atol=1e-8)
    assert removal_cost(w, hinv, sets[1]) == pytest.approx(err, abs=1e-8)
    # greedy sequence of two channels, no damping: exact sequential least squares
    removed, final, costs = greedy_remove(w, h, sets, 2, percdamp=0.0)
    assert len(removed) == 2 and len(set(removed)) == 2 and len(costs) == 2
    gone = sets[removed].reshape(-1).tolist()
    keep = _keep(8, gone)
    w_keep, err = _refit(x, w, keep)
    assert bool((final[:, gone] == 0).all())
    assert torch.allclose(final[:, keep], w_keep, atol=1e-8)
    assert sum(costs) == pytest.approx(err, abs=1e-8)
    # the first pick is the one-shot cheapest, and the second is the cheapest given the first
    one_shot = channel_costs(w, h, sets, percdamp=0.0)
    assert removed[0] == int(torch.argmin(one_shot))
    assert costs[0] == pytest.approx(float(one_shot.min()), rel=1e-10)
    rest = [c for c in range(4) if c != removed[0]]
    pair_err = [_refit(x, w, _keep(8, sets[[removed[0], c]].reshape(-1).tolist()))[1] for c in rest]
    assert removed[1] == rest[min(range(3), key=pair_err.__getitem__)]
    # downdate agrees with inverting the kept block of H
    hd = downdate(hinv, sets[removed[0]])
    k = _keep(8, sets[removed[0]].tolist())
    assert torch.allclose(hd[k][:, k], torch.linalg.inv(h[k][:, k]), atol=1e-8)
    assert bool((hd[sets[removed[0]]] == 0).all())


def test_greedy_picks_the_cheapest_with_ties_to_the_lower_index():
    w = torch.tensor([[3.0, 1.0, 1.0, 2.0], [0.0, 1.0, 1.0, 0.0]])
    h = torch.eye(4)
    sets = columns_of_channels(4, 1)
    # H = I: cost of a column is its squared norm (9, 2, 2, 4), no coupling between columns
    removed, final, costs = greedy_remove(w, h, sets, 3, percdamp=0.0)
    assert removed == [1, 2, 3]
    assert costs == pytest.approx([2.0, 2.0, 4.0])
    assert final.dtype == torch.float64
    assert final.tolist() == [[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert channel_costs(w, h, sets, percdamp=0.0).tolist() == pytest.approx([9.0, 2.0, 2.0, 4.0])
    none, same, no_costs = greedy_remove(w, h, sets, 0)
    assert none == [] and no_costs == [] and torch.equal(same, w.double())
    with pytest.raises(ValueError):
        greedy_remove(w, h, sets, 4)
    with pytest.raises(ValueError):
        greedy_remove(w, h, sets, -1)


def test_dead_input_channel_is_free_to_remove():
    w = torch.tensor([[1.0, 5.0, 2.0]])
    h = torch.diag(torch.tensor([1.0, 0.0, 1.0]))
    removed, final, costs = greedy_remove(w, h, columns_of_channels(3, 1), 1)
    assert removed == [1] and costs == [0.0]
    assert final[0, 1] == 0


def _empirical_h(samples: torch.Tensor) -> torch.Tensor:
    return samples.T @ samples / samples.shape[0]


@pytest.mark.parametrize("relu", [True, False])
def test_data_free_hessian_matches_sampled_gaussian_inputs(relu):
    mean = torch.tensor([-1.0, 0.5, 2.0, -0.3, 0.7], dtype=torch.float64)
    std = torch.tensor([1.0, 2.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    n = 400_000
    g = torch.Generator().manual_seed(3)
    # [n, C, positions]: every channel and position drawn independently
    z = mean[None, :, None] + std[None, :, None] * torch.randn(n, 5, 2, generator=g, dtype=torch.float64)
    x = z.clamp_min(0.0) if relu else z
    moments = relu_gaussian_moments(mean, std, relu=relu)
    for per_channel in (1, 2):
        emp = _empirical_h(x[:, :, :per_channel].reshape(n, 5 * per_channel))
        model = hessian_from_moments(*moments, per_channel=per_channel)
        assert model.shape == (5 * per_channel, 5 * per_channel)
        assert torch.allclose(model, emp, rtol=1e-2, atol=2e-2), (model - emp).abs().max()
    if relu:
        # the dead channel (std 0, negative mean) is exactly zero
        assert moments[0][3] == 0 and moments[1][3] == 0
        assert moments[0][4] == pytest.approx(0.7) and moments[1][4] == pytest.approx(0.49)


def test_rectified_gaussian_closed_forms():
    first, second = relu_gaussian_moments(torch.tensor([0.0]), torch.tensor([1.0]))
    assert float(first) == pytest.approx(1.0 / math.sqrt(2.0 * math.pi))
    assert float(second) == pytest.approx(0.5)
    first, second = relu_gaussian_moments(torch.tensor([1.0]), torch.tensor([2.0]), relu=False)
    assert (float(first), float(second)) == (1.0, 5.0)


def test_bn_input_moments_pre_activation_statistics():
    running_mean = torch.tensor([10.0, -3.0])
    running_var = torch.tensor([3.0, 0.0])
    weight = torch.tensor([-2.0, 1.0])
    bias = torch.tensor([0.5, -1.0])
    # std = |gamma| sqrt(var / (var + eps)) = 2 sqrt(3/4) = sqrt(3), and 0 for the zero-variance channel
    first, second = bn_input_moments(running_mean, running_var, weight, bias, eps=1.0, relu=False)
    assert first.tolist() == pytest.approx([0.5, -1.0])
    assert second.tolist() == pytest.approx([0.25 + 3.0, 1.0])
    first, second = bn_input_moments(running_mean, running_var, weight, bias, eps=1.0)
    ref = relu_gaussian_moments(torch.tensor([0.5, -1.0]), torch.tensor([math.sqrt(3.0), 0.0]))
    assert torch.allclose(first, ref[0]) and torch.allclose(second, ref[1])
    assert first[1] == 0 and second[1] == 0


def test_dampen_handles_a_zero_diagonal():
    h = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 4.0]])
    out = dampen(h, 0.1)
    lam = 0.1 * (2.0 + 1.0 + 4.0) / 3.0
    assert out.dtype == torch.float64
    assert torch.diagonal(out).tolist() == pytest.approx([2.0 + lam, 1.0 + lam, 4.0 + lam])
    assert out[0, 2] == 1.0 and out[1, 0] == 0.0
    assert h[1, 1] == 0  # the input is not modified
    torch.linalg.cholesky(out)
