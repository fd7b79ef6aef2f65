"""FLAP maths: channel metrics, unit scores, cost-weighted allocation, and compensation.

Pure tensor functions (no modules). Notation: a pruned linear layer is W [d_out, d_in]; its input
channel j has, over calibration tokens, mean mu_j, population variance var_j and mean square
ms_j = sqnorm_j / count.

Metrics (score of input channel j; larger = more important):
    ifv   var_j                                  fluctuation of the input
    wifv  var_j * ||W[:, j]||^2                  weighted fluctuation (FLAP default)
    wifn  mean_i |W_ij| * sqrt(ms_j)             weighted input feature norm

Units: an attention unit is a KV group (one KV head and its G query heads: G*head_dim o_proj input
channels); its score is the mean of its channels' standardized scores. The reference code squares
the attention channel scores before standardizing (the paper does not); the pass does so by
default (`square_attn`), which is what reproduces the reference's numbers. An MLP unit is one
neuron (one down_proj input channel).

Compensation for removed input channels R (kept K):
    mean  b = W[:, R] mu_R                       => E[W_K x_K + b] = E[W x] on calibration data
    lsq   W_K' = W_K + W_R C_RK (C_KK + rI)^-1,  b = W mu - W_K' mu_K
          (C: population covariance; the least-squares linear reconstruction of W x from x_K,
          which keeps the mean identity exactly)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METRICS = ("ifv", "wifv", "wifn")
STRUCTURES = ("UL-UM", "UL-MM", "AL-MM", "AL-AM")


def channel_scores(metric: str, weight: torch.Tensor, var: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
    """Score of each input channel of `weight` [d_out, d_in] (float64, [d_in])."""
    w = weight.detach().double()
    if metric == "ifv":
        return var.double().clone()
    if metric == "wifv":
        return var.double() * (w * w).sum(0)
    if metric == "wifn":
        return w.abs().mean(0) * mean_square.double().clamp_min(0).sqrt()
    raise ValueError(f"unknown FLAP metric {metric!r}; expected one of {METRICS}")


def standardize(x: torch.Tensor) -> torch.Tensor:
    """z-score over all entries; a constant vector maps to zeros."""
    std = x.std() if x.numel() > 1 else x.new_tensor(0.0)
    if not torch.isfinite(std) or float(std) == 0.0:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def unit_scores(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mean channel score of each unit; `index[u]` lists the channels unit u owns ([units, k])."""
    return scores[index].mean(1)


def kv_group_cost(group_size: int, head_dim: int, hidden: int) -> int:
    """Weights of one KV group: G q heads + 1 k + 1 v head (rows) and G heads of o_proj (columns)."""
    return (2 * group_size + 2) * head_dim * hidden


def neuron_cost(hidden: int) -> int:
    """Weights of one gated-MLP neuron: a gate row, an up row and a down column."""
    return 3 * hidden


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
    if not 0.0 <= p_mlp < 1.0:
        raise ValueError(
            f"attn_sparsity={attn_sparsity} cannot reach overall sparsity {sparsity}: the MLP would need to remove {p_mlp:.3f} of its weights"
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


def mean_bias(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """b = W[:, R] mu_R: what the removed input channels contributed on average."""
    w = weight.detach().double()
    return w[:, removed] @ mean.double()[removed]


def lsq_compensation(
    weight: torch.Tensor,
    mean: torch.Tensor,
    cov: torch.Tensor,
    kept: torch.Tensor,
    removed: torch.Tensor,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_K' [d_out, |K|], b [d_out]): least-squares reconstruction of W x from the kept channels.

    Minimises E||W x - (W_K' x_K + b)||^2 over the calibration distribution, with a ridge of
    `ridge` times the mean kept-channel variance on C_KK (it keeps nearly collinear channels stable).
    """
    w = weight.detach().double()
    mu, c = mean.double(), cov.double()
    w_k, w_r = w[:, kept], w[:, removed]
    if removed.numel() == 0:
        return w_k, torch.zeros(w.shape[0], dtype=torch.float64)
    c_kk = c[kept][:, kept]
    c_kr = c[kept][:, removed]
    damp = ridge * float(torch.diagonal(c_kk).mean().clamp_min(1e-12))
    a = c_kk + damp * torch.eye(kept.numel(), dtype=torch.float64)
    delta = torch.linalg.solve(a, c_kr @ w_r.T).T  # W_R C_RK A^-1 (A symmetric)
    w_new = w_k + delta
    b = w @ mu - w_new @ mu[kept]
    return w_new, b


def lsq_cross(
    weight: torch.Tensor,
    kept: torch.Tensor,
    mean_x: torch.Tensor,
    mean_z: torch.Tensor,
    cov_xz: torch.Tensor,
    cov_zz: torch.Tensor,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' [d_out, k], b): least-squares fit of the dense output W x from other inputs z.

    z are the kept channels as the pruned model computes them (its earlier layers already pruned),
    x the dense model's full input for the same tokens. The ridge pulls W' towards the unchanged
    kept columns W_K: W' = (W C_xz + rW_K)(C_zz + rI)^-1, b = W E[x] - W' E[z]. With z = x_K this
    is exactly `lsq_compensation`.
    """
    w = weight.detach().double()
    damp = ridge * float(torch.diagonal(cov_zz).mean().clamp_min(1e-12))
    a = cov_zz.double() + damp * torch.eye(cov_zz.shape[0], dtype=torch.float64)
    rhs = w @ cov_xz.double() + damp * w[:, kept]
    w_new = torch.linalg.solve(a, rhs.T).T
    b = w @ mean_x.double() - w_new @ mean_z.double()
    return w_new, b
