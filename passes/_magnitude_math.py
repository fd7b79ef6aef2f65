"""Magnitude scores for gated-MLP neurons (pure tensor maths, no model).

Neuron j of a gated MLP owns row j of gate_proj and up_proj and column j of down_proj. Its score is
the L2 norm of all its weights together:

    s_j = sqrt(||W_gate[j, :]||^2 + ||W_up[j, :]||^2 + ||W_down[:, j]||^2)
"""

from __future__ import annotations

import math

import torch


def neuron_norms(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """[I] L2 norm of each neuron's gate row, up row and down column (float64 for stable ties)."""
    if gate.shape != up.shape or down.shape[1] != gate.shape[0] or down.shape[0] != gate.shape[1]:
        raise ValueError(f"shapes do not form a gated MLP: gate {tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)}")
    g, u, d = (t.detach().to(torch.float64) for t in (gate, up, down))
    return (g.pow(2).sum(1) + u.pow(2).sum(1) + d.pow(2).sum(0)).sqrt()


def prune_count(width: int, sparsity: float, multiple_of: int = 1) -> int:
    """How many of `width` units to remove for `sparsity`, keeping >= 1 and, where it can, a kept
    width that is a multiple of `multiple_of` (rounded up, so the pruned fraction never exceeds the ask)."""
    if width <= 1:
        return 0
    keep = width - math.floor(sparsity * width + 1e-9)
    if multiple_of > 1:
        keep = min(width, math.ceil(keep / multiple_of) * multiple_of)
    return width - max(1, keep)


def lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n lowest scores (ties broken by lower index), sorted ascending."""
    if n <= 0:
        return torch.empty(0, dtype=torch.long)
    order = torch.sort(scores, stable=True).indices
    return torch.sort(order[:n]).values
