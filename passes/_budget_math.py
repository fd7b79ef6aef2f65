"""Choosing channels to remove under a budget (pure maths, no model), shared by HESSO and SPA.

`select_channels` ranks every candidate channel of every group globally (by score, lowest first, or by
score per unit of cost) and takes channels until the model's cost, given as functions (e.g.
`compiler.analysis.costs.CostModel.cost` / `.saving`), reaches a target, respecting per-group floors
and kept-width multiples.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def select_channels(scores: Sequence[torch.Tensor], pruned: Sequence[Sequence[int]], cost: Callable[[list[int]], float],
                    saving: Callable[[list[int], int, int], float], target: float, floors: Sequence[int],
                    multiples: Sequence[int], rank_cost: Sequence[torch.Tensor] | None = None) -> list[list[int]]:
    """New channels to prune, per group, so that the model's cost drops to `target` (or as far as it can).

    Candidates are the channels not in `pruned`, ranked globally by score, lowest first, or by
    score / `rank_cost` (the channel's dense cost) when given; ties go to the lower (group, channel).
    A group whose kept count must be a multiple of m = `multiples[i]` offers its channels in blocks
    (in its own order: first the remainder that brings it to a multiple, then blocks of m) ranked by
    their mean; taking a block keeps the width a multiple. A group never keeps fewer than `floors[i]`.
    `cost(removed)` is the model's cost with `removed[i]` channels out of group i; `saving(removed, i, n)`
    the drop when group i loses n more.
    """
    removed = [len(p) for p in pruned]
    now = cost(removed)
    units: list[tuple[float, int, int, list[int]]] = []
    for gi, s in enumerate(scores):
        taken = set(int(c) for c in pruned[gi])
        rank = s if rank_cost is None else s / rank_cost[gi].clamp_min(1e-30)
        free = [c for c in torch.argsort(rank, stable=True).tolist() if c not in taken]
        m = max(1, int(multiples[gi]))
        first = (len(s) - removed[gi]) % m
        blocks = ([free[:first]] if first else []) + [free[j:j + m] for j in range(first, len(free) - m + 1, m)]
        units.extend((float(rank[b].mean()), gi, k, b) for k, b in enumerate(blocks) if b)
    units.sort(key=lambda u: (u[0], u[1], u[2]))  # block means rise within a group, so its blocks come in order
    new: list[list[int]] = [[] for _ in scores]
    for _, gi, _, block in units:
        if now <= target:
            break
        size = len(scores[gi])
        if size - removed[gi] - len(block) < floors[gi]:
            continue
        now -= saving(removed, gi, len(block))
        removed[gi] += len(block)
        new[gi].extend(block)
    return [sorted(n) for n in new]
