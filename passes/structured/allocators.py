"""Allocators: which prunable units to keep, given unit scores, costs and a target (pure tensor maths).

A `UnitSet` is the units of one module kind of one layer: their scores (higher = more important),
the parameters each unit costs and how many the layer must keep. Every allocator returns one
boolean keep mask per set.

    uniform        every set keeps the same fraction on its own (top-k per set)
    global         one pool across layers (and modules): the highest scores are kept until the kept
                   cost is nearest (1 - p) of the total; a unit's cost only moves the cut (FLAP AL-AM;
                   `per-module`: one pool per module kind, FLAP AL-MM)
    two-pools      attention units and MLP units each in one global pool, the MLP removing gamma
                   times the attention's fraction: f_a A + gamma f_a M = p (A + M) (NIRVANA)
    block-sigmoid  per layer keep ratio r_l = keep * s_l / mean(s), s_l = sigmoid(slope (I_l - mean I) / T)
                   from a block importance I_l, capped at `max_keep` with the excess handed to the
                   other layers; top-k inside each layer (CFSP's coarse step)

Rounding: `round_keep` rounds every set's kept count to a multiple while the total stays nearest
its value (pooled), `round_up_keep` rounds each set up on its own (NIRVANA's MLP widths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimc.errors import SlimcError

STRUCTURES = ("UL-UM", "UL-MM", "AL-MM", "AL-AM")


@dataclass
class UnitSet:
    """The prunable units of one module of one layer (e.g. layer 3's KV groups)."""

    layer: int
    kind: str  # "attn" | "mlp"
    scores: torch.Tensor  # [n] raw unit scores (per-layer z-scored where the structure says so)
    cost: int  # parameters per unit
    min_keep: int = 1

    @property
    def size(self) -> int:
        return int(self.scores.numel())

    @property
    def total(self) -> int:
        return self.size * self.cost


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping the k highest scores (ties broken by lower index)."""
    k = max(0, min(int(k), scores.numel()))
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    order = torch.sort(scores, descending=True, stable=True).indices
    keep[order[:k]] = True
    return keep


def select_global(sets: list[UnitSet], keep_cost: float) -> list[torch.Tensor]:
    """Keep the highest-scoring units of a shared pool until the kept cost is nearest `keep_cost`.

    Units compete on score alone; a unit's parameter cost only moves the cut. Each set first keeps
    its `min_keep` best units (the floor), which count towards the kept cost.
    """
    masks = [top_k_mask(s.scores, min(s.min_keep, s.size)) for s in sets]
    forced = sum(int(m.sum()) * s.cost for m, s in zip(masks, sets))
    scores, costs, owner, pos = [], [], [], []
    for i, (s, m) in enumerate(zip(sets, masks)):
        free = (~m).nonzero().squeeze(1)
        scores.append(s.scores[free].double())
        costs.append(torch.full((free.numel(),), s.cost, dtype=torch.float64))
        owner.append(torch.full((free.numel(),), i, dtype=torch.long))
        pos.append(free)
    if not scores:
        return masks
    scores_t, costs_t, owner_t, pos_t = (torch.cat(x) for x in (scores, costs, owner, pos))
    order = torch.sort(scores_t, descending=True, stable=True).indices
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(costs_t[order], 0)])
    n_keep = int(torch.argmin((cum - (keep_cost - forced)).abs()))
    for j in order[:n_keep].tolist():
        masks[int(owner_t[j])][int(pos_t[j])] = True
    return masks


def keep_count(size: int, cost: int, keep_cost: float, min_keep: int) -> int:
    """Units to keep so that the kept cost is nearest `keep_cost`, at least `min_keep`."""
    return max(min(min_keep, size), min(size, int(round(keep_cost / cost))))


def allocate(
    attn: list[UnitSet],
    mlp: list[UnitSet],
    sparsity: float,
    structure: str,
    attn_sparsity: float | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keep masks for every attention and MLP unit set.

    `sparsity` is the fraction of attention+MLP parameters to remove. Structures:
      UL-UM  every layer and module removes the same fraction (per-set top-k)
      UL-MM  every layer the same; attention removes `attn_sparsity`, the MLP the rest of the layer's share
      AL-MM  attention units share one pool across layers (and MLP units another), per-module ratios as UL-MM
      AL-AM  one pool of all units across layers and modules (FLAP default)
    The adaptive structures expect per-layer standardized scores.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown FLAP structure {structure!r}; expected one of {STRUCTURES}")
    p_attn, p_mlp = module_ratios(attn, mlp, sparsity, attn_sparsity)
    if structure == "AL-AM":
        masks = select_global(attn + mlp, (1.0 - sparsity) * sum(s.total for s in attn + mlp))
        return masks[: len(attn)], masks[len(attn) :]
    if structure == "AL-MM":
        return (
            select_global(attn, (1.0 - p_attn) * sum(s.total for s in attn)),
            select_global(mlp, (1.0 - p_mlp) * sum(s.total for s in mlp)),
        )
    # uniform across layers: each set keeps its share on its own
    a = [top_k_mask(s.scores, keep_count(s.size, s.cost, (1.0 - p_attn) * s.total, s.min_keep)) for s in attn]
    m = [top_k_mask(s.scores, keep_count(s.size, s.cost, (1.0 - p_mlp) * s.total, s.min_keep)) for s in mlp]
    return a, m


def module_ratios(attn: list[UnitSet], mlp: list[UnitSet], sparsity: float, attn_sparsity: float | None) -> tuple[float, float]:
    """(attention, MLP) removal fractions whose cost-weighted mean is `sparsity`."""
    if attn_sparsity is None:
        return sparsity, sparsity
    a_tot = sum(s.total for s in attn)
    m_tot = sum(s.total for s in mlp)
    p_mlp = (sparsity * (a_tot + m_tot) - attn_sparsity * a_tot) / max(m_tot, 1)
    if not 0.0 <= p_mlp < 1.0:  # an option combination the user chose: a one-line error, not a crash
        raise SlimcError(
            f"attn_sparsity={attn_sparsity} cannot reach overall sparsity {sparsity}: the MLP would need to remove {p_mlp:.3f} "
            "of its weights; choose an attn_sparsity nearer the sparsity"
        )
    return attn_sparsity, p_mlp


def _top(scores: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """`mask` resized to `count` units: drop its worst kept units or add the best removed ones."""
    k = int(mask.sum())
    out = mask.clone()
    if count > k:
        cand = (~mask).nonzero().squeeze(1)
        out[cand[torch.sort(scores[cand], descending=True, stable=True).indices[: count - k]]] = True
    elif count < k:
        cand = mask.nonzero().squeeze(1)
        out[cand[torch.sort(scores[cand], stable=True).indices[: k - count]]] = False
    return out


def round_keep(masks: list[torch.Tensor], scores: list[torch.Tensor], multiple: int) -> list[torch.Tensor]:
    """Round every set's kept count to a multiple (at least one multiple, at most all), keeping the total.

    All sets are rounded down first; then the chunks that would round a set up are added back,
    best mean score first, while the total stays nearest its value before rounding. Within a set
    the rest of the choice stands: rounding drops its worst kept units or adds its best removed
    ones. The sets' units must cost the same (e.g. every layer's MLP neurons).
    """
    if multiple <= 1:
        return [m.clone() for m in masks]
    target = sum(int(m.sum()) for m in masks)
    lo, hi = [], []
    for m in masks:
        n, k = m.numel(), int(m.sum())
        down = min(n, max(multiple, (k // multiple) * multiple))
        lo.append(down)
        hi.append(n if k == n else min(n, down + multiple) if k > down else down)
    out = [_top(s, m, c) for s, m, c in zip(scores, masks, lo)]
    # a chunk's merit: the mean score of the units rounding up would add
    chunks = []
    for i, (s, m) in enumerate(zip(scores, out)):
        if hi[i] > lo[i]:
            added = _top(s, m, hi[i]) & ~m
            chunks.append((float(s[added].mean()), i))
    kept = sum(lo)
    for _, i in sorted(chunks, key=lambda c: -c[0]):
        step = hi[i] - lo[i]
        if abs(kept + step - target) < abs(kept - target):
            out[i] = _top(scores[i], out[i], hi[i])
            kept += step
    return out


def two_pools(attn: list[UnitSet], mlp: list[UnitSet], sparsity: float, gamma: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """NIRVANA's allocation: attention and MLP units in two global pools; the MLP removes gamma
    times the attention's fraction of its parameters, f_a A + gamma f_a M = p (A + M). When the MLP
    share would exceed 1 it is capped and the attention takes the rest."""
    if gamma <= 0:
        raise ValueError(f"gamma must be positive (got {gamma})")
    a_tot = sum(s.total for s in attn)
    m_tot = sum(s.total for s in mlp)
    removed = sparsity * (a_tot + m_tot)
    f_a = removed / max(a_tot + gamma * m_tot, 1)
    f_m = gamma * f_a
    if f_m > 1.0:
        f_m = 1.0
        f_a = (removed - m_tot) / max(a_tot, 1)
    if f_a > 1.0:
        raise SlimcError(f"sparsity {sparsity} cannot be reached with gamma {gamma}: it would remove more than every "
                         "attention and MLP unit; lower the sparsity")
    return select_global(attn, (1.0 - f_a) * a_tot), select_global(mlp, (1.0 - f_m) * m_tot)


def block_keep_ratios(importance: torch.Tensor, keep: float, temperature: float, slope: float = 1.0,
                      max_keep: float = 0.95) -> torch.Tensor:
    """Per-layer keep ratios with mean `keep`, higher for layers of higher block importance.

    r_l = keep * s_l / mean(s), s_l = sigmoid(slope * (I_l - mean(I)) / temperature). Ratios above
    `max_keep` are capped and the excess is spread over the uncapped layers in proportion to s (evenly
    where every uncapped s has underflowed to 0, as a tiny temperature makes it).
    """
    imp = importance.double()
    if temperature <= 0:
        raise ValueError(f"temperature must be positive (got {temperature})")
    s = torch.sigmoid(slope * (imp - imp.mean()) / temperature)
    cap = max(max_keep, keep)
    r = keep * s / s.mean()
    capped = torch.zeros_like(r, dtype=torch.bool)
    for _ in range(r.numel()):
        over = (r > cap + 1e-12) & ~capped
        if not over.any():
            break
        capped |= over
        free = ~capped
        budget = keep * r.numel() - cap * int(capped.sum())
        weight = s[free].sum() if free.any() else None
        if weight is None:
            spread = r
        elif weight > 0:
            spread = budget * s / weight
        else:  # a tiny temperature saturates the sigmoid to 0 on every uncapped layer: spread the excess evenly
            spread = torch.full_like(r, budget / int(free.sum()))
        r = torch.where(capped, torch.full_like(r, cap), spread)
    return r.clamp(0.0, 1.0)


def block_sigmoid(sets: list[UnitSet], importance: torch.Tensor, sparsity: float, temperature: float,
                  slope: float = 1.0, max_keep: float = 0.95) -> list[torch.Tensor]:
    """CFSP's coarse step: per-layer keep ratios from block importance, then top-k per layer.

    The per-layer counts are rounded so that the total kept cost is nearest (1 - sparsity) of the
    sets' total (largest remainders first), each at least its floor.
    """
    ratios = block_keep_ratios(importance, 1.0 - sparsity, temperature, slope, max_keep)
    want = torch.tensor([float(r) * s.size for r, s in zip(ratios, sets)], dtype=torch.float64)
    counts = [max(min(s.min_keep, s.size), int(w)) for w, s in zip(want.floor(), sets)]
    target = (1.0 - sparsity) * sum(s.total for s in sets)
    kept = sum(c * s.cost for c, s in zip(counts, sets))
    order = torch.sort(want - want.floor(), descending=True, stable=True).indices.tolist()
    for i in order * 2:  # add units, largest remainder first, while that brings the total nearer
        s = sets[i]
        if counts[i] < s.size and abs(kept + s.cost - target) < abs(kept - target):
            counts[i] += 1
            kept += s.cost
    return [top_k_mask(s.scores, c) for s, c in zip(sets, counts)]


def round_up_keep(masks: list[torch.Tensor], scores: list[torch.Tensor], multiple: int) -> list[torch.Tensor]:
    """Each set's kept count rounded up to a multiple (at most all), adding its best removed units."""
    if multiple <= 1:
        return [m.clone() for m in masks]
    out = []
    for m, s in zip(masks, scores):
        k = int(m.sum())
        up = min(m.numel(), -(-k // multiple) * multiple)
        out.append(_top(s, m, up))
    return out
