"""N:M mask maths (pure tensor functions): which N of every M consecutive inputs a row keeps.

A group is M consecutive input columns of one output row, columns [g*M, (g+1)*M). Each criterion
gives a score per weight; the N highest scores of each group are kept.

    magnitude:  S_ij = |W_ij|
    Wanda:      S_ij = |W_ij| * ||X_j||_2      (||X_j||_2 over all calibration tokens; compared only
                                                within a group of one row, as the N:M constraint asks)

SparseGPT (OBS with column-wise error compensation) lives in `_sparsegpt_math.py`.
"""

from __future__ import annotations

import torch


def nm_mask_from_scores(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask [out, in] keeping the `n` highest scores of every group of `m` inputs.

    Ties go to the lower column (topk on a stable sort), so the mask is deterministic.
    """
    out, inp = scores.shape
    if inp % m:
        raise ValueError(f"{inp} inputs are not divisible by M={m}")
    g = scores.reshape(out, inp // m, m)
    idx = g.argsort(dim=-1, descending=True, stable=True)[..., :n]
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(out, inp)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()


def wanda_scores(weight: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 from the per-input sum of squares over calibration tokens."""
    norm = sqnorm.to(torch.float64).clamp_min(0).sqrt().to(weight.device)
    return weight.abs().to(torch.float64) * norm.unsqueeze(0)


def is_exact_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of `m` inputs keeps exactly `n` entries."""
    out, inp = mask.shape
    return inp % m == 0 and bool((mask.reshape(out, inp // m, m).sum(-1) == n).all())


def reconstruction_error(w_old: torch.Tensor, w_new: torch.Tensor, gram: torch.Tensor) -> float:
    """sum over tokens ||W_old x - W_new x||^2 = tr(D H D^T), D = W_old - W_new, H = sum x x^T."""
    d = (w_old.to(torch.float64) - w_new.to(torch.float64))
    return float(torch.einsum("ij,jk,ik->", d, gram.to(torch.float64), d))
