"""SPA-style group importance: any per-weight criterion transferred to channel groups (pure tensor maths).

"Structurally Prune Anything" scores a structured unit by scoring every weight it owns with an unstructured
criterion and aggregating those scores over the whole group. Channel c of a group owns, in every slice, the
indices `slice.index[c]` along `slice.axis` of a tensor T; below, W_c is the set of all the weights channel c
owns over all the slices of the group (G and F are the matching gradient and Fisher entries).

Per-weight criteria (`weight_scores`, element-wise, same shape as the weight):

    l1      |w|
    l2      w^2
    taylor  |w * g|               first-order Taylor estimate of the loss change when w is zeroed
    obd     0.5 * f * w^2         Optimal Brain Damage with the diagonal empirical Fisher
                                  f = mean over batches of g^2 (accumulated by the caller)

Aggregations of the per-weight scores over W_c (`channel_scores`):

    sum     s_c = sum_{w in W_c} score(w)
    mean    s_c = sum_{w in W_c} score(w) / |W_c|
    max     s_c = max_{w in W_c} score(w)

l2 with sum is the sum of squares, i.e. the square of the group L2 norm of `_group_magnitude_math`; the
square root is not taken because it does not change the ranking.

Channel-level criteria (the aggregation argument is ignored):

    fpgm     s_c = sum_j || v_c - v_j ||_2, v_c the concatenation of W_c over the slices (Filter Pruning via
             Geometric Median: a channel close to the others' geometric median is redundant, so low score)
    lamp     s_c = q_c / sum_{j : rank_j >= rank_c} q_j with q_c = sum_{w in W_c} w^2 and ranks of q ascending,
             ties broken by channel index (Layer-Adaptive Magnitude Pruning applied to channels)
    bn_scale s_c = sum over the normalisation-scale slices of |gamma[index[c]]|; a scale slice is one whose
             tensor is 1-D and whose name ends with "weight" (BatchNorm / LayerNorm scale)
    random   uniform [0, 1) draws from a generator seeded with seed + crc32(group name): reproducible for a
             given group name and seed, independent of Python's per-process hash salt

Normalisers (`normalise`, each group separately, so that groups of different sizes and layers can be ranked
against each other globally):

    none      s
    mean      s / mean(s)
    max       s / max(s)
    gaussian  (s - mean(s)) / max(std(s), 1e-12), population std
    lamp      s_c / sum_{j : rank_j >= rank_c} s_j, ranks ascending, ties broken by index

A zero denominator in mean / max / lamp leaves the affected values as they are (an all-zero group stays all
zero). Scores are higher = more important; everything is computed in float64 and returned as CPU float64
tensors of shape [group.size].
"""

from __future__ import annotations

import zlib
from typing import Mapping

import torch

from slimc.compiler.groups import Group, Slice

CRITERIA = ("l1", "l2", "taylor", "obd", "fpgm", "lamp", "bn_scale", "random")
AGGREGATIONS = ("sum", "mean", "max")
NORMALISERS = ("none", "mean", "max", "gaussian", "lamp")

_PER_WEIGHT = ("l1", "l2", "taylor", "obd")


def weight_scores(
    criterion: str,
    w: torch.Tensor,
    grad: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
) -> torch.Tensor:
    """Element-wise float64 score of every weight of `w` (same shape, same device) under a per-weight criterion."""
    w = w.detach().to(torch.float64)
    if criterion == "l1":
        return w.abs()
    if criterion == "l2":
        return w.pow(2)
    if criterion == "taylor":
        if grad is None:
            raise ValueError("criterion 'taylor' needs the gradient of the weight (grad)")
        _check_shape("grad", grad, w)
        return (w * grad.detach().to(device=w.device, dtype=torch.float64)).abs()
    if criterion == "obd":
        if fisher is None:
            raise ValueError("criterion 'obd' needs the diagonal Fisher of the weight (fisher)")
        _check_shape("fisher", fisher, w)
        return 0.5 * fisher.detach().to(device=w.device, dtype=torch.float64) * w.pow(2)
    raise ValueError(f"unknown per-weight criterion {criterion!r}; expected one of {_PER_WEIGHT}")


def channel_scores(
    group: Group,
    tensors: Mapping[str, torch.Tensor],
    criterion: str = "l2",
    aggregation: str = "sum",
    *,
    grads: Mapping[str, torch.Tensor] | None = None,
    fishers: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """[group.size] CPU float64 importance of each channel of `group` (higher = more important).

    Slices whose tensor is not in `tensors` (e.g. a buffer that was not passed) are skipped; a ValueError is
    raised when none remains, or when taylor / obd find no slice with a gradient / Fisher entry.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    present = [s for s in group.slices if s.param in tensors]
    if not present:
        raise ValueError(f"group {group.name!r}: none of its tensors {group.params()} is in the given tensors")

    if criterion == "random":
        gen = torch.Generator().manual_seed((seed + zlib.crc32(group.name.encode("utf-8"))) & 0xFFFF_FFFF_FFFF_FFFF)
        return torch.rand(group.size, generator=gen, dtype=torch.float64)
    if criterion == "fpgm":
        return _fpgm(group, present, tensors)
    if criterion == "lamp":
        sq = _aggregate(group, [_owned(group, s, weight_scores("l2", tensors[s.param])) for s in present], "sum")
        return normalise([sq], "lamp")[0]
    if criterion == "bn_scale":
        scales = [s for s in present if tensors[s.param].dim() == 1 and s.param.endswith("weight")]
        if not scales:
            raise ValueError(f"group {group.name!r} has no normalisation scale")
        return _aggregate(group, [_owned(group, s, tensors[s.param].detach().to(torch.float64).abs()) for s in scales], "sum")

    extra = {"taylor": ("grads", grads), "obd": ("fishers", fishers)}.get(criterion)
    if extra is not None:
        label, table = extra
        if table is None:
            raise ValueError(f"criterion {criterion!r} needs {label}")
        present = [s for s in present if s.param in table]
        if not present:
            raise ValueError(f"criterion {criterion!r}: no tensor of group {group.name!r} has an entry in {label}")
    parts = []
    for s in present:
        grad = grads[s.param] if criterion == "taylor" else None
        fisher = fishers[s.param] if criterion == "obd" else None
        parts.append(_owned(group, s, weight_scores(criterion, tensors[s.param], grad, fisher)))
    return _aggregate(group, parts, aggregation)


def normalise(scores: list[torch.Tensor], method: str = "mean") -> list[torch.Tensor]:
    """Normalise each group's scores separately (list in, list out, same shapes, CPU float64)."""
    if method not in NORMALISERS:
        raise ValueError(f"unknown normaliser {method!r}; expected one of {NORMALISERS}")
    return [_normalise_one(s.detach().to(device="cpu", dtype=torch.float64), method) for s in scores]


def _normalise_one(s: torch.Tensor, method: str) -> torch.Tensor:
    if method == "none" or s.numel() == 0:
        return s.clone()
    if method == "mean":
        return _safe_div(s, s.mean())
    if method == "max":
        return _safe_div(s, s.max())
    if method == "gaussian":
        return (s - s.mean()) / s.std(correction=0).clamp_min(1e-12)
    # lamp: a stable ascending sort breaks ties by index; the denominator of rank i is the sum of ranks >= i.
    flat = s.reshape(-1)
    ordered, order = torch.sort(flat, stable=True)
    tail = ordered.flip(0).cumsum(0).flip(0)
    ranked = torch.where(tail != 0, ordered / torch.where(tail != 0, tail, torch.ones_like(tail)), ordered)
    out = torch.empty_like(flat)
    out[order] = ranked
    return out.reshape(s.shape)


def _safe_div(s: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    return s.clone() if denom == 0 else s / denom


def _check_shape(label: str, t: torch.Tensor, w: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(w.shape):
        raise ValueError(f"{label} has shape {tuple(t.shape)}, the weight has {tuple(w.shape)}")


def _owned(group: Group, s: Slice, t: torch.Tensor) -> torch.Tensor:
    """[group.size, m] CPU float64: row c holds the entries of `t` that channel c owns in slice `s`."""
    axis = s.axis % t.dim()
    picked = t.index_select(axis, s.index.reshape(-1).to(t.device)).movedim(axis, 0)
    return picked.reshape(group.size, -1).to(device="cpu", dtype=torch.float64)


def _aggregate(group: Group, parts: list[torch.Tensor], aggregation: str) -> torch.Tensor:
    if aggregation == "max":
        maxima = [p.amax(1) for p in parts if p.shape[1]]
        if not maxima:  # channels that own no weight at all
            return torch.zeros(group.size, dtype=torch.float64)
        return torch.stack(maxima).amax(0)
    total = torch.zeros(group.size, dtype=torch.float64)
    count = 0
    for p in parts:
        total += p.sum(1)
        count += p.shape[1]
    if aggregation == "mean" and count:
        total /= count
    return total


def _fpgm(group: Group, present: list[Slice], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    v = torch.cat([_owned(group, s, tensors[s.param].detach().to(torch.float64)) for s in present], dim=1)
    # Direct pairwise differences (not the |a|^2 + |b|^2 - 2ab expansion): identical channels get exactly 0.
    return torch.cdist(v[None], v[None], p=2.0, compute_mode="donot_use_mm_for_euclid_dist")[0].sum(1)
