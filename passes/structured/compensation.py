"""Compensation: the kept weights absorb what the removed units contributed (pure maths + applying it).

For a pruned output projection W [d_out, d_in] with removed input channels R and kept K, over
calibration inputs with mean mu and population covariance C:

    mean  b = W[:, R] mu_R                       => E[W_K x_K + b] = E[W x] on calibration data
    lsq   W_K' = W_K + W_R C_RK (C_KK + rI)^-1,  b = W mu - W_K' mu_K
          (the least-squares linear reconstruction of W x from x_K; it keeps the mean identity exactly)

`lsq_cross` fits the dense output from inputs the pruned prefix computes (sequential lsq, see
`structured.sequential`). `Compensation` records one projection's edit; `compensate` applies a
plan's edits before the channels are removed.

The maths takes W as [d_out, d_in]. A projection stores its weight with its input axis at
`in_axis` (nn.Linear [out, in]: 1; transformers' Conv1D [in, out]: 0); `set_input_columns` writes
refitted columns back along that axis. Biases are always added on the output side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Compensation:
    """Edits to one output projection before its inputs are removed: new kept columns, added bias."""

    linear: str  # module path
    bias: torch.Tensor  # [d_out] float64, added to the output
    kept: torch.Tensor | None = None  # kept input columns whose weights change (lsq)
    weight: torch.Tensor | None = None  # [d_out, len(kept)] their new weights (lsq)
    in_axis: int = 1  # the projection weight's input axis (1: nn.Linear, 0: Conv1D)


def set_input_columns(weight: torch.Tensor, in_axis: int, kept: torch.Tensor, new: torch.Tensor) -> None:
    """weight's input entries `kept` (along `in_axis`) := `new` [d_out, len(kept)], in place."""
    with torch.no_grad():
        weight.movedim(in_axis, -1)[:, kept.to(weight.device)] = new.to(dtype=weight.dtype, device=weight.device)


def add_output_bias(linear: nn.Module, bias: torch.Tensor) -> None:
    """Add `bias` to a linear's output (nn.Linear or Conv1D), creating its bias parameter when it has none."""
    b = bias.to(dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        if linear.bias is None:
            linear.bias = nn.Parameter(b.clone(), requires_grad=linear.weight.requires_grad)
        else:
            linear.bias.add_(b)


def compensate(module: nn.Module, compensations: list[Compensation]) -> None:
    """Apply a plan's weight refits and output biases (before the channels are removed)."""
    for c in compensations:
        linear = module.get_submodule(c.linear)
        if c.weight is not None:
            set_input_columns(linear.weight, c.in_axis, c.kept, c.weight)
        add_output_bias(linear, c.bias)


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
