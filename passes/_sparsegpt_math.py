"""SparseGPT for N:M masks (pure tensor maths): optimal-brain-surgeon pruning, column by column.

For a linear layer y = W x with calibration Gram matrix H = sum_tokens x x^T (in x in), pruning
weight W_ij and updating the rest of row i to minimise ||W x - W' x||^2 costs
w_ij^2 / [H^-1]_jj and moves the not-yet-processed weights of the row by
-(w_ij / [H^-1]_jj) * [H^-1]_{j, j:}. Processing columns left to right, the inverse Hessians of the
shrinking problems are the rows of the upper Cholesky factor U of H^-1 (H^-1 = U^T U), so one
factorisation serves all columns.

    H <- H + lambda I, lambda = damp * mean(diag H)   (dead inputs: diag 0 -> 1, their weights 0)
    U = chol(H^-1) (upper)
    for each block of B columns (B = 128):
        for each column j in the block:
            at the first column of every group of M: in each row keep the N columns of the group
            with the largest w^2 / U_jj^2 (scores from the weights as already updated), prune the rest
            q_j = w_j masked;  e_j = (w_j - q_j) / U_jj
            W[:, j:block end] -= e_j U[j, j:block end]
        W[:, block end:] -= E_block U[block, block end:]     (lazy batch update)
"""

from __future__ import annotations

import torch


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (float64)."""
    lower = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True)


def sparsegpt_nm(
    weight: torch.Tensor,
    gram: torch.Tensor,
    n: int,
    m: int,
    *,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` [out, in] to N:M with SparseGPT. Returns (new weight in weight's dtype, keep mask).

    `gram` is H = sum over calibration tokens of x x^T, [in, in]. `block_size` must be a multiple of `m`.
    """
    if block_size % m:
        raise ValueError(f"block_size {block_size} must be a multiple of M={m}")
    out, inp = weight.shape
    if inp % m:
        raise ValueError(f"{inp} inputs are not divisible by M={m}")
    w = weight.detach().to(torch.float32).clone()
    h = gram.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    mean_diag = float(torch.diagonal(h).mean())
    lam = damp * mean_diag
    u = None
    for _ in range(6):  # an ill-conditioned H gets more damping rather than a failure
        try:
            u = _inverse_cholesky_upper(h + lam * torch.eye(inp, dtype=torch.float64))
            break
        except torch.linalg.LinAlgError:
            # ten times more, and at least 1e-6 of the mean diagonal: a vanishing `damp` (5e-324) would
            # otherwise stay negligible through every retry
            lam = max(lam * 10, 1e-6 * max(mean_diag, 1.0))
    if u is None:
        raise torch.linalg.LinAlgError("SparseGPT: the calibration Gram matrix is not positive definite even with damping")
    u = u.to(torch.float32)
    keep = torch.zeros(out, inp, dtype=torch.bool)
    for b0 in range(0, inp, block_size):
        b1 = min(b0 + block_size, inp)
        wb = w[:, b0:b1].clone()
        qb = torch.zeros_like(wb)
        eb = torch.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        kb = torch.zeros_like(wb, dtype=torch.bool)
        for j in range(b1 - b0):
            if j % m == 0:
                d = torch.diagonal(ub)[j : j + m]
                score = wb[:, j : j + m] ** 2 / d.unsqueeze(0) ** 2
                top = score.argsort(dim=1, descending=True, stable=True)[:, :n]
                kb[:, j : j + m].scatter_(1, top, True)
            col = wb[:, j]
            q = torch.where(kb[:, j], col, torch.zeros((), dtype=col.dtype))
            qb[:, j] = q
            err = (col - q) / ub[j, j]
            wb[:, j:] -= err.unsqueeze(1) * ub[j, j:].unsqueeze(0)
            eb[:, j] = err
        w[:, b0:b1] = qb
        keep[:, b0:b1] = kb
        if b1 < inp:
            w[:, b1:] -= eb @ u[b0:b1, b1:]
    w = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
    return w.to(weight.dtype), keep
