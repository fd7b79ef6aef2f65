"""HESSO's maths (pure tensors, no model): hybrid saliency and the linear ramp.

A *channel* of a slimc group is one of OTO's zero-invariant groups: x_c are all the weights it owns
(every slice of the group: producer rows, norm scales and shifts, consumer columns), d_c their
gradients at the scoring step. The five proxies of HESSO (only_train_once's `importance_score`):

    magnitude            ||x_c||
    avg_magnitude        ||x_c|| / |x_c|
    cosine_similarity    cos(x_c, d_c) + 1
    taylor_first_order   |<x_c, d_c>|
    taylor_second_order  0.5 <x_c, d_c>^2

each divided by its L2 norm over every candidate channel of the model, then summed with weights
(0.2 each by default). Low saliency = redundant.

Selection under a budget is `_budget_math.select_channels` (shared with SPA's global allocation).

Ramp: a channel selected at the start of a period of T steps is multiplied, after the base
optimizer's step t = 0..T-1 of the period, by (T - t - 1) / (T - t); the product over the period is
exactly 0 at t = T - 1 (the last factor is 0), and the decay is linear in t.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from slimc.compiler.groups import Group

PROXIES = ("magnitude", "avg_magnitude", "cosine_similarity", "taylor_first_order", "taylor_second_order")
DEFAULT_WEIGHTS = {p: 0.2 for p in PROXIES}


def channel_sums(group: Group, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor | None]
                 ) -> dict[str, torch.Tensor]:
    """Per channel of `group` (float64 [size]): sum x^2, sum d^2, sum x d and the element count n,
    over every slice whose tensor is in `params` (a slice on a buffer, or without a gradient, adds
    its x^2 and n only)."""
    xx = torch.zeros(group.size, dtype=torch.float64)
    dd, xd, n = torch.zeros_like(xx), torch.zeros_like(xx), torch.zeros_like(xx)
    for s in group.slices:
        t = params.get(s.param)
        if t is None:
            continue
        axis = s.axis % t.dim()
        idx = s.index.reshape(-1).to(t.device)
        x = t.detach().index_select(axis, idx).movedim(axis, 0).reshape(group.size, -1).to(torch.float64).cpu()
        xx += x.pow(2).sum(1)
        n += x.shape[1]
        g = grads.get(s.param)
        if g is not None:
            d = g.detach().index_select(axis, idx).movedim(axis, 0).reshape(group.size, -1).to(torch.float64).cpu()
            dd += d.pow(2).sum(1)
            xd += (x * d).sum(1)
    return {"xx": xx, "dd": dd, "xd": xd, "n": n}


def proxies(sums: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The five raw proxies from `channel_sums`."""
    xn, dn = sums["xx"].sqrt(), sums["dd"].sqrt()
    inner = sums["xd"]
    return {
        "magnitude": xn,
        "avg_magnitude": xn / sums["n"].clamp_min(1),
        "cosine_similarity": inner / (xn + 1e-8) / (dn + 1e-8) + 1,
        "taylor_first_order": inner.abs(),
        "taylor_second_order": 0.5 * inner.pow(2),
    }


def hybrid_saliency(per_group: Sequence[Mapping[str, torch.Tensor]], weights: Mapping[str, float] = DEFAULT_WEIGHTS
                    ) -> list[torch.Tensor]:
    """Weighted sum of the proxies, each normalised by its L2 norm over all channels of all groups."""
    unknown = set(weights) - set(PROXIES)
    if unknown:
        raise ValueError(f"unknown saliency proxies {sorted(unknown)}; known: {', '.join(PROXIES)}")
    scores = [torch.zeros_like(next(iter(p.values()))) for p in per_group]
    for name, w in weights.items():
        if not w:
            continue
        norm = torch.cat([p[name] for p in per_group]).norm() if per_group else torch.tensor(0.0)
        if not norm > 0:
            continue
        for s, p in zip(scores, per_group):
            s += w * p[name] / norm
    return scores


def ramp(t: int, period: int) -> float:
    """The factor applied after step t (0-based) of a period of `period` steps: (T - t - 1) / (T - t)."""
    if not 0 <= t < period:
        raise ValueError(f"step {t} is outside a period of {period} steps")
    return (period - t - 1) / (period - t)


def period_targets(total: float, periods: int, dense: float | None = None, schedule: str = "linear") -> list[float]:
    """Cumulative amounts to have removed by the end of each of `periods` periods: equal shares of `total`
    (`linear`, HESSO's), or (`geometric`, needs the `dense` cost) the same fraction of what is left each period,
    so the kept cost falls as dense * (kept / dense)^((k + 1) / K) and the late periods, which cut an already
    small network, take smaller steps."""
    if schedule == "linear":
        return [total * (k + 1) / periods for k in range(periods)]
    if schedule != "geometric" or dense is None or dense <= 0:
        raise ValueError(f"unknown period schedule {schedule!r} (or no dense cost for the geometric one)")
    kept = max(dense - total, 1e-12) / dense
    return [dense - dense * kept ** ((k + 1) / periods) for k in range(periods)]
