"""Criteria: a score per prunable unit, higher = more important (a registry; pure tensor maths).

Notation: a unit owns input columns j of its output projection W [d_out, d_in] (o_proj for a KV
group, down_proj for a neuron; a Conv1D's [in, out] weight is read transposed, `units.out_weight`)
and rows of the projections before it; over calibration tokens
input channel j has mean mu_j, population variance var_j, mean square ms_j and squared norm
||X_j||^2 = sqnorm_j.

    flap-ifv     var_j                                  } z-scored over the layer's channels, averaged
    flap-wifv    var_j * ||W[:, j]||^2                  } over the unit's channels (FLAP; the attention
    flap-wifn    mean_i |W_ij| * sqrt(ms_j)             } channel scores squared first, as its code does)
    wanda-sp     mean_i |W_ij| * ||X_j||, averaged over the unit's channels
    cfsp         CFSP's fine score: for every tensor slice the unit owns, |W| normalised over the
                 layer's units (the other axis than the mean: the released code normalises over the
                 mean's axis, which collapses the score to a_j^c; `cfsp_faithful` keeps that), the
                 output projection's columns weighted by a_j^b, summed, averaged over the hidden axis
                 and times a_j^c; a_j = RMS of the unit's output-projection inputs
    saliency     NIRVANA: L1 over every weight the unit owns of |theta * df/dtheta|, f the mean
                 max-logit output proxy
    taylor       the same L1 with f the language-model loss (first-order Taylor)
    obs          optimal brain surgeon: the output error left after the kept inputs are refit by least
                 squares, tr(W_U ((H^-1)_UU)^-1 W_U^T), H the inputs' covariance (damped) — the cost
                 `compensation: lsq` actually pays
    magnitude    L2 norm of every weight the unit owns

Each criterion names what it needs collected: input statistics of the output projections
("inputs", only for units whose projection is `observable`) or a saliency ("saliency:<objective>").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from slimc.compiler.calibration.stats import InputStats
from slimc.compiler.groups import Group
from slimc.passes._group_magnitude_math import group_channel_norms
from slimc.passes.structured.units import ATTN, Units, out_weight

FLAP_METRICS = ("ifv", "wifv", "wifn")


# ---- pure maths ---------------------------------------------------------------------------------


def flap_channel_scores(metric: str, weight: torch.Tensor, var: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
    """FLAP's score of each input channel of `weight` [d_out, d_in] (float64, [d_in])."""
    w = weight.detach().double()
    if metric == "ifv":
        return var.double().clone()
    if metric == "wifv":
        return var.double() * (w * w).sum(0)
    if metric == "wifn":
        return w.abs().mean(0) * mean_square.double().clamp_min(0).sqrt()
    raise ValueError(f"unknown FLAP metric {metric!r}; expected one of {FLAP_METRICS}")


def standardize(x: torch.Tensor) -> torch.Tensor:
    """z-score over all entries; a constant vector maps to zeros."""
    std = x.std() if x.numel() > 1 else x.new_tensor(0.0)
    if not torch.isfinite(std) or float(std) == 0.0:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def unit_mean(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mean channel score of each unit; `index[u]` lists the channels unit u owns ([units, k])."""
    return scores[index].mean(1)


def wanda_sp_channel_scores(weight: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """mean_i |W_ij| * ||X_j|| per input channel j (Wanda-sp)."""
    return weight.detach().double().abs().mean(0) * sqnorm.double().clamp_min(0).sqrt()


def _unit_rows(group: Group, tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(param, |W| [units, m]) per slice of `group`: every weight a unit owns in that tensor, one row per unit."""
    out = []
    for s in group.slices:
        t = tensors[s.param].detach().double()
        axis = s.axis % t.dim()
        picked = t.index_select(axis, s.index.reshape(-1).to(t.device)).movedim(axis, 0)
        out.append((s.param, picked.reshape(group.size, -1).abs().cpu()))
    return out


def cfsp_scores(group: Group, tensors: Mapping[str, torch.Tensor], out_param: str, rms: torch.Tensor,
                b: float = 1.0, c: float = 1.0, faithful: bool = False) -> torch.Tensor:
    """CFSP's fine score of each unit of `group` (float64 [units]); `rms` [units] is a_j.

    Each slice's |W| [units, m] is normalised over the units (RIA-style, the default) or over its
    own m weights (`faithful`: the released code, where the normalisation axis is the mean's);
    the output projection's slice is weighted by a^b first. Each term is averaged over its m axis
    (for neurons every slice has m = hidden), the terms are summed and multiplied by a^c.
    """
    a = rms.double().clamp_min(0)
    total = None
    for param, w in _unit_rows(group, tensors):
        if param == out_param:
            w = w * a.pow(b)[:, None]
        denom = w.sum(1, keepdim=True) if faithful else w.sum(0, keepdim=True)
        term = (w / denom.clamp_min(1e-30)).mean(1)  # each slice averaged over its own weights
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"group {group.name} owns no weights")
    return total * a.pow(c)


def obs_costs(weight: torch.Tensor, cov: torch.Tensor, index: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Optimal-brain-surgeon cost of removing each unit when the kept inputs are refit by least squares.

    weight [d_out, d_in], cov [d_in, d_in] the inputs' covariance, index [units, k] the input
    channels each unit owns. With H = cov + damp * mean(diag cov) I, removing channels U and
    refitting the rest optimally raises E||W x - W' x'||^2 by tr(W_U ((H^-1)_UU)^-1 W_U^T)
    (exactly what `compensation: lsq` then does). Units are costed one at a time.
    """
    w = weight.detach().double()
    h = cov.double() + damp * float(torch.diagonal(cov).double().mean().clamp_min(1e-12)) * torch.eye(cov.shape[0], dtype=torch.float64)
    h_inv = torch.linalg.inv(h)
    if index.shape[1] == 1:  # one channel per unit (neurons): ||W_j||^2 / [H^-1]_jj
        j = index[:, 0]
        return (w[:, j] ** 2).sum(0) / torch.diagonal(h_inv)[j]
    costs = torch.empty(index.shape[0], dtype=torch.float64)
    for u, cols in enumerate(index):
        w_u = w[:, cols]  # [d_out, k]
        costs[u] = torch.trace(w_u @ torch.linalg.solve(h_inv[cols][:, cols], w_u.T))
    return costs


def group_l1(group: Group, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """L1 of every entry each unit owns, over the group's tensors (float64 [units])."""
    return sum(w.sum(1) for _, w in _unit_rows(group, tensors))


# ---- the registry ---------------------------------------------------------------------------------


@dataclass
class ScoreInputs:
    """What a criterion may read: the model's tensors, collected statistics, options."""

    tensors: Mapping[str, torch.Tensor]  # parameters by name
    inputs: Mapping[str, InputStats] = field(default_factory=dict)  # input statistics by module path
    saliency: Mapping[str, torch.Tensor] = field(default_factory=dict)  # |theta * grad| by parameter name
    options: Mapping[str, Any] = field(default_factory=dict)  # square_attn, cfsp_b, cfsp_c, cfsp_faithful


@dataclass(frozen=True)
class Criterion:
    name: str
    needs: frozenset[str]  # "inputs" (input moments), "gram" (their Gram matrices), "saliency:<objective>"
    fn: Callable[[Units, ScoreInputs], torch.Tensor]
    normalized: bool = False  # the scores are already comparable across layers (z-scored per layer)


def _flap(metric: str) -> Callable[[Units, ScoreInputs], torch.Tensor]:
    def score(u: Units, d: ScoreInputs) -> torch.Tensor:
        st = d.inputs[u.out_proj]
        ch = flap_channel_scores(metric, out_weight(u, d.tensors), st.var, st.sqnorm / st.count)
        if u.kind == ATTN and d.options.get("square_attn", True):
            ch = ch * ch
        return unit_mean(standardize(ch), u.out_index)  # z-score per (layer, module): one scale for all

    return score


def _wanda_sp(u: Units, d: ScoreInputs) -> torch.Tensor:
    st = d.inputs[u.out_proj]
    return unit_mean(wanda_sp_channel_scores(out_weight(u, d.tensors), st.sqnorm), u.out_index)


def _cfsp(u: Units, d: ScoreInputs) -> torch.Tensor:
    st = d.inputs[u.out_proj]
    rms = unit_mean((st.sqnorm / st.count).clamp_min(0), u.out_index).sqrt()
    o = d.options
    return cfsp_scores(u.group, d.tensors, u.out_param, rms, o.get("cfsp_b", 1.0), o.get("cfsp_c", 1.0),
                       o.get("cfsp_faithful", False))


def _saliency(u: Units, d: ScoreInputs) -> torch.Tensor:
    return group_l1(u.group, d.saliency)


def _obs(u: Units, d: ScoreInputs) -> torch.Tensor:
    st = d.inputs[u.out_proj]
    return obs_costs(out_weight(u, d.tensors), st.covariance(), u.out_index, d.options.get("obs_damp", 0.01))


def _magnitude(u: Units, d: ScoreInputs) -> torch.Tensor:
    return group_channel_norms(u.group, d.tensors)


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        *(Criterion(f"flap-{m}", frozenset({"inputs"}), _flap(m), normalized=True) for m in FLAP_METRICS),
        Criterion("wanda-sp", frozenset({"inputs"}), _wanda_sp),
        Criterion("cfsp", frozenset({"inputs"}), _cfsp),
        Criterion("obs", frozenset({"inputs", "gram"}), _obs),
        Criterion("saliency", frozenset({"saliency:max_logit"}), _saliency),
        Criterion("taylor", frozenset({"saliency:loss"}), _saliency),
        Criterion("magnitude", frozenset(), _magnitude),
    )
}
