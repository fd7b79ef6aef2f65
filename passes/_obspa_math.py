"""OBSPA: optimal-brain-surgeon structured pruning of input channels (pure tensor maths, no model).

A consumer layer computes y = W x with W [out, d]. For a linear layer one input channel owns one
column of W; for a conv, W is the weight reshaped to [out, cin*kh*kw] and x the unfolded input patch,
so input channel c owns the kh*kw consecutive columns c*kh*kw ... (c+1)*kh*kw - 1
(`columns_of_channels`). With H = E[x x^T] [d, d] and Hinv = H^-1, removing the set Q of columns and
refitting the remaining weights by least squares (minimising E||W x - W' x||^2) gives

    M         = ((Hinv)_QQ)^-1
    cost(Q)   = trace(W[:, Q] M W[:, Q]^T)            (the increase of E||W x - W' x||^2, summed over rows)
    delta W   = - W[:, Q] M (Hinv)_{Q, :}             (W + delta W has zero columns Q)

and the inverse Hessian of the inputs that remain is the block downdate

    Hinv <- Hinv - Hinv[:, Q] M Hinv[Q, :]            (rows / columns Q become 0 and are ignored after)

Greedy removal (`greedy_remove`, OBC / SparseGPT style): dampen H once (H + percdamp * mean(diag H) I,
dead inputs with diag 0 first set to 1 and their weights zeroed, as SparseGPT does), invert it by
Cholesky, then repeatedly compute cost(Q_c) for every channel c not yet removed with the current
Hinv and the current W, remove the cheapest one (ties to the lowest index), apply its update to W and
downdate Hinv. Without damping each step is the exact least-squares refit given the channels already
removed, so the final W equals the direct least-squares refit on the channels that remain and the step
costs add up to its total error increase.

Data-free H (`bn_input_moments`, `relu_gaussian_moments`, `hessian_from_moments`): when the layer's
input is x = ReLU(BN(z)) (or BN(z) without the activation) and BN is in eval mode,
BN(z) = gamma (z - mu) / sqrt(var + eps) + beta. Taking z per channel with exactly the running
statistics (mean mu, variance var) and Gaussian, the pre-activation of channel c is Gaussian with mean
beta_c and standard deviation |gamma_c| sqrt(var_c / (var_c + eps)). Through a ReLU, y ~ N(m, s^2)
becomes a rectified Gaussian with (a = m / s, Phi / phi the standard normal cdf / pdf)

    E[ReLU(y)]   = m Phi(a) + s phi(a)
    E[ReLU(y)^2] = (m^2 + s^2) Phi(a) + m s phi(a)

(s = 0: a point mass at max(m, 0)); without the activation E[y] = m, E[y^2] = m^2 + s^2. Assuming the
inputs independent across channels and across spatial positions,

    H = mean mean^T + diag(E[x^2] - mean^2)

with every column of channel c (all of its kh*kw patch positions) carrying channel c's moments, so
inside a channel's patch the off-diagonal entries are mean_c^2. Zero padding at the borders is ignored
(border patches see zeros that this model does not). Real activations are correlated across channels
and positions and BN's running statistics describe training batches, so this H is an approximation;
its pruning quality is to be measured against the H estimated from calibration data.
"""

from __future__ import annotations

import math

import torch


def dampen(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """H + percdamp * mean(diag H) * I in float64 (a new tensor); dead inputs (diag 0) get diag 1 first.

    Setting a dead input's diagonal to 1 keeps H invertible without moving the other entries, as
    SparseGPT does; the relative damping keeps the inverse well conditioned whatever the scale of H.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square, got shape {tuple(H.shape)}")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    h = H.detach().to(torch.float64).clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += percdamp * float(diag.mean()) if h.shape[0] else 0.0
    return h


def columns_of_channels(channels: int, per_channel: int) -> torch.Tensor:
    """int64 [channels, per_channel]: channel c owns columns c*per_channel .. (c+1)*per_channel - 1."""
    if channels < 0 or per_channel < 1:
        raise ValueError(f"need channels >= 0 and per_channel >= 1, got {channels}, {per_channel}")
    return torch.arange(channels * per_channel, dtype=torch.int64).reshape(channels, per_channel)


def _as_columns(Q: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    q = torch.as_tensor(Q, dtype=torch.int64, device=device).reshape(-1)
    if q.numel() == 0:
        raise ValueError("the set of removed columns Q is empty")
    return q


def _batched_costs(W: torch.Tensor, Hinv: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """[S] cost trace(W_Q ((Hinv)_QQ)^-1 W_Q^T) for each row Q of `sets` [S, k], in one batched solve."""
    hqq = Hinv[sets.unsqueeze(-1), sets.unsqueeze(-2)]  # [S, k, k]
    wq = W[:, sets].permute(1, 2, 0)  # [S, k, out]
    # (Hinv)_QQ is symmetric, so W_Q M W_Q^T summed over rows = sum(W_Q^T * M W_Q^T)
    return (wq * torch.linalg.solve(hqq, wq)).sum(dim=(1, 2))


def removal_cost(W: torch.Tensor, Hinv: torch.Tensor, Q: torch.Tensor) -> float:
    """Least-squares cost of removing columns Q: trace(W[:, Q] ((Hinv)_QQ)^-1 W[:, Q]^T)."""
    q = _as_columns(Q, W.device)
    return float(_batched_costs(W.to(torch.float64), Hinv.to(torch.float64), q.unsqueeze(0))[0])


def removal_update(W: torch.Tensor, Hinv: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """delta W = -W[:, Q] ((Hinv)_QQ)^-1 (Hinv)_{Q, :} [out, d]; W + delta W has zero columns Q to rounding."""
    q = _as_columns(Q, W.device)
    w = W.to(torch.float64)
    hinv = Hinv.to(torch.float64)
    # W_Q M = (M W_Q^T)^T, M symmetric
    wm = torch.linalg.solve(hinv[q][:, q], w[:, q].T).T
    return -wm @ hinv[q, :]


def downdate(Hinv: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Inverse Hessian of the inputs left after removing Q: Hinv - Hinv[:, Q] ((Hinv)_QQ)^-1 Hinv[Q, :].

    Rows and columns Q are set to exactly 0 (they are 0 up to rounding) and the result is symmetrised,
    so later costs and updates never touch removed columns.
    """
    q = _as_columns(Q, Hinv.device)
    hinv = Hinv.to(torch.float64)
    out = hinv - hinv[:, q] @ torch.linalg.solve(hinv[q][:, q], hinv[q, :])
    out = 0.5 * (out + out.T)
    out[q, :] = 0.0
    out[:, q] = 0.0
    return out


def _check_sets(column_sets: torch.Tensor, d: int) -> torch.Tensor:
    sets = torch.as_tensor(column_sets, dtype=torch.int64)
    if sets.dim() != 2 or sets.shape[1] < 1:
        raise ValueError(f"column_sets must be [C, k] with k >= 1, got shape {tuple(sets.shape)}")
    if sets.numel() and (int(sets.min()) < 0 or int(sets.max()) >= d):
        raise ValueError(f"column_sets reference columns outside 0..{d - 1}")
    if sets.unique().numel() != sets.numel():
        raise ValueError("column_sets must not share columns between (or within) channels")
    return sets


def _prepare(W: torch.Tensor, H: torch.Tensor, column_sets: torch.Tensor, percdamp: float):
    """float64 W (dead columns zeroed), Hinv of the dampened H, validated column sets."""
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W must be [out, d] and H [d, d], got {tuple(W.shape)} and {tuple(H.shape)}")
    w = W.detach().to(torch.float64).clone()
    h = H.detach().to(device=w.device, dtype=torch.float64)
    # an input that is always 0 contributes nothing to the output: its weights can go for free
    w[:, torch.diagonal(h) == 0] = 0.0
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(dampen(h, percdamp)))
    return w, hinv, _check_sets(column_sets, w.shape[1]).to(w.device)


def greedy_remove(
    W: torch.Tensor,
    H: torch.Tensor,
    column_sets: torch.Tensor,
    n_remove: int,
    percdamp: float = 0.01,
) -> tuple[list[int], torch.Tensor, list[float]]:
    """Remove `n_remove` channels one at a time, each time the one whose removal costs least now.

    `column_sets` [C, k]: channel c owns columns column_sets[c] of W [out, d]; H [d, d] is E[x x^T]
    (or any positive multiple of it: costs scale with it, the choices and updates do not).
    Returns (removed channels in removal order, updated W in float64 with the removed columns exactly 0,
    the cost of each step). Columns whose H diagonal is 0 (dead inputs) are zeroed in W up front.
    """
    if n_remove < 0:
        raise ValueError(f"n_remove must be >= 0, got {n_remove}")
    w, hinv, sets = _prepare(W, H, column_sets, percdamp)
    if n_remove >= sets.shape[0]:
        raise ValueError(f"cannot remove {n_remove} of {sets.shape[0]} channels: at least one must remain")
    if n_remove == 0:
        return [], W.detach().to(torch.float64).clone(), []
    removed: list[int] = []
    costs: list[float] = []
    alive = torch.ones(sets.shape[0], dtype=torch.bool, device=w.device)
    for _ in range(n_remove):
        step = torch.full((sets.shape[0],), math.inf, dtype=torch.float64, device=w.device)
        step[alive] = _batched_costs(w, hinv, sets[alive])
        c = int(torch.argmin(step))  # the first minimum: ties go to the lowest index
        q = sets[c]
        w += removal_update(w, hinv, q)
        w[:, q] = 0.0
        hinv = downdate(hinv, q)
        alive[c] = False
        removed.append(c)
        costs.append(float(step[c]))
    return removed, w, costs


def channel_costs(W: torch.Tensor, H: torch.Tensor, column_sets: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """[C] float64 one-shot cost of removing each channel alone (dampened H, dead inputs as in greedy_remove)."""
    w, hinv, sets = _prepare(W, H, column_sets, percdamp)
    if sets.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    return _batched_costs(w, hinv, sets)


def relu_gaussian_moments(mean: torch.Tensor, std: torch.Tensor, relu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (E[x], E[x^2]) float64 of x = ReLU(y) (or x = y if not `relu`), y ~ N(mean, std^2).

    std == 0 is a point mass: (max(m, 0), max(m, 0)^2) with the ReLU.
    """
    m = torch.as_tensor(mean, dtype=torch.float64)
    s = torch.as_tensor(std, dtype=torch.float64)
    m, s = torch.broadcast_tensors(m, s)
    if bool((s < 0).any()):
        raise ValueError("std must be >= 0")
    if not relu:
        return m.clone(), m * m + s * s
    positive = s > 0
    s_safe = torch.where(positive, s, torch.ones_like(s))
    a = m / s_safe
    cdf = torch.special.ndtr(a)
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    first = m * cdf + s_safe * pdf
    second = (m * m + s_safe * s_safe) * cdf + m * s_safe * pdf
    point = m.clamp_min(0.0)
    # cancellation for very negative a can give tiny negative values: moments of a non-negative x are >= 0
    first = torch.where(positive, first.clamp_min(0.0), point)
    second = torch.where(positive, second.clamp_min(0.0), point * point)
    return first, second


def bn_input_moments(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    relu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (E[x], E[x^2]) of x = ReLU(BN(z)) (or BN(z)) with z at BN's running statistics.

    The pre-activation is modelled as N(bias, (|weight| sqrt(var / (var + eps)))^2); `running_mean`
    does not enter, since eval-mode BN subtracts it exactly.
    """
    var = torch.as_tensor(running_var, dtype=torch.float64)
    gamma = torch.as_tensor(weight, dtype=torch.float64)
    beta = torch.as_tensor(bias, dtype=torch.float64)
    if torch.as_tensor(running_mean).shape != var.shape:
        raise ValueError("running_mean and running_var must have the same shape")
    if bool((var < 0).any()):
        raise ValueError("running_var must be >= 0")
    var_eps = var + eps
    ratio = torch.where(var_eps > 0, var / torch.where(var_eps > 0, var_eps, torch.ones_like(var_eps)), torch.zeros_like(var))
    std = gamma.abs() * ratio.sqrt()
    return relu_gaussian_moments(beta, std, relu=relu)


def hessian_from_moments(mean: torch.Tensor, second: torch.Tensor, per_channel: int = 1) -> torch.Tensor:
    """H = E[x x^T] [C*per_channel, C*per_channel] float64 for independent channels and positions.

    Columns are channel-major (columns_of_channels(C, per_channel), a conv weight reshaped to
    [out, cin*kh*kw]): H = mean mean^T + diag(E[x^2] - mean^2), each channel's moments repeated over
    its per_channel positions. The variance is clamped at 0 against rounding.
    """
    if per_channel < 1:
        raise ValueError(f"per_channel must be >= 1, got {per_channel}")
    mu = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    sq = torch.as_tensor(second, dtype=torch.float64).reshape(-1)
    if mu.shape != sq.shape:
        raise ValueError(f"mean and second must have the same length, got {mu.numel()} and {sq.numel()}")
    var = (sq - mu * mu).clamp_min(0.0).repeat_interleave(per_channel)
    mu = mu.repeat_interleave(per_channel)
    return torch.outer(mu, mu) + torch.diag(var)


def greedy_scores(systems: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], percdamp: float = 0.01,
                  weights: list[float] | None = None, rounds: int = 64) -> torch.Tensor:
    """[C] float64: an OBC-style importance for the C channels of one group that several consumer layers read.

    `systems`: (W [out, d], H [d, d], column_sets [C, k]) per consumer, the same C channels in each.
    Channels are removed greedily, each step the one whose removal costs least summed over the consumers
    (each consumer's W updated and Hinv downdated as in `greedy_remove`, costs times `weights[i]`); a
    channel's score is the total cost once it is removed (the cumulative sum of the steps so far), so
    scores rise along the removal order and say what pruning down to that channel costs. The channel
    left last scores twice the largest total (it is never removed). One-shot costs (`channel_costs`)
    would call each of several redundant channels cheap although removing them all is not.

    A group of many channels is removed in at most `rounds` rounds: each round takes the ceil(C / rounds)
    cheapest channels at once (one joint update and downdate), which keeps wide layers (an LLM's 1,536
    MLP neurons) to 64 downdates of H instead of 1,535; with C <= rounds every round is one channel.
    """
    if not systems:
        raise ValueError("greedy_scores needs at least one consumer system")
    weights = [1.0] * len(systems) if weights is None else weights
    state = [list(_prepare(W, H, sets, percdamp)) for W, H, sets in systems]
    C = state[0][2].shape[0]
    if any(s[2].shape[0] != C for s in state):
        raise ValueError("every consumer system must list the same number of channels")
    scores = torch.zeros(C, dtype=torch.float64)
    alive = torch.ones(C, dtype=torch.bool)
    total = 0.0
    per_round = max(1, math.ceil(C / max(1, rounds)))
    while int(alive.sum()) > 1:
        step = torch.zeros(C, dtype=torch.float64)
        for (w, hinv, sets), wt in zip(state, weights):
            step[alive] += wt * _batched_costs(w, hinv, sets[alive]).cpu()
        step[~alive] = math.inf
        take = torch.argsort(step, stable=True)[:min(per_round, int(alive.sum()) - 1)]  # ties: the lower index
        for c in take.tolist():
            total += float(step[c])
            scores[c] = total
        for s in state:
            w, hinv, sets = s
            q = sets[take].reshape(-1)
            w += removal_update(w, hinv, q)
            w[:, q] = 0.0
            s[1] = downdate(hinv, q)
        alive[take] = False
    scores[alive] = 2.0 * total if total > 0 else 1.0
    return scores
