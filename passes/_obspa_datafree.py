"""Data-free input moments for OBSPA: per-channel E[x] and E[x^2] of a layer's input, from the BatchNorm
statistics upstream of it in the graph IR (no calibration data).

The walk starts at the layer's input and goes back through the ops whose effect on a channel's
distribution is known, representing each channel by a bank of samples ([n, C], float64, one
generator seeded per call):

- `norm` (batch, eval mode): the channel is Gaussian N(beta, (|gamma| sqrt(var / (var + eps)))^2) — the
  pre-normalisation values are taken to have exactly the running statistics (`_obspa_math.bn_input_moments`);
- `unary` relu: samples clamped at 0 (the rectified Gaussian of `_obspa_math.relu_gaussian_moments`,
  here by sampling so it composes with what follows); dropout / identity-like ops pass through;
- `add` of two such values: samples added (the two branches taken as independent);
- `pool` (max / avg) and `reduce` mean over spatial axes: k draws per output (k = the spatial size ratio,
  each draw a fresh permutation of the bank) combined by max / mean;
- `reshape` that keeps the channel count on axis 1 (a flatten after global pooling) passes through.

Anything else (a graph input, an op not listed) ends the walk: the caller falls back to another
source of H (synthetic inputs). Channels, positions and branches are assumed independent and zero
padding is ignored: an approximation, measured against the calibration H (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from slimc.compiler.ir.graph import Node, Value

PASS_THROUGH = {"dropout", "identity", "clone", "contiguous", "alias", "detach"}
SAMPLES = 8192


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d if isinstance(d, int) else 1
    return out


class _Walk:
    def __init__(self, tensors: Mapping[str, torch.Tensor], eps_of: Callable[[str], float], seed: int, samples: int):
        self.tensors, self.eps_of, self.n = tensors, eps_of, samples
        self.gen = torch.Generator().manual_seed(seed)
        self.memo: dict[int, torch.Tensor | None] = {}

    def draws(self, bank: torch.Tensor, k: int) -> torch.Tensor:
        """[k, n, C]: k re-orderings of the bank's rows, as k (approximately) independent draws."""
        return torch.stack([bank[torch.randperm(bank.shape[0], generator=self.gen)] for _ in range(k)])

    def value(self, v: Value | None, depth: int = 0) -> torch.Tensor | None:
        if v is None or depth > 64:
            return None
        if id(v) not in self.memo:
            self.memo[id(v)] = self._value(v, depth)
        return self.memo[id(v)]

    def _param(self, v: Value | None) -> torch.Tensor | None:
        if v is None or v.param is None or v.param not in self.tensors:
            return None
        return self.tensors[v.param].detach().to(torch.float64).reshape(-1).cpu()

    def _value(self, v: Value, depth: int) -> torch.Tensor | None:
        node: Node | None = v.producer
        if node is None:
            return None
        op, fn = node.op, str(node.attrs.get("fn", ""))
        if op == "norm" and node.attrs.get("kind") == "batch" and not node.attrs.get("instance") and len(node.inputs) >= 5:
            gamma, beta, var = self._param(node.inputs[1]), self._param(node.inputs[2]), self._param(node.inputs[4])
            if gamma is None or beta is None or var is None:
                return None
            eps = self.eps_of(node.inputs[1].param)
            std = gamma.abs() * (var / (var + eps)).clamp_min(0.0).sqrt()
            return beta + std * torch.randn(self.n, beta.numel(), generator=self.gen, dtype=torch.float64)
        if op == "unary" and fn.rstrip("_") == "relu":
            x = self.value(node.inputs[0], depth + 1)
            return None if x is None else x.clamp_min(0.0)
        if op == "unary" and fn.rstrip("_") in PASS_THROUGH:
            return self.value(node.inputs[0], depth + 1)
        if op == "add" and len(node.inputs) == 2:
            a, b = self.value(node.inputs[0], depth + 1), self.value(node.inputs[1], depth + 1)
            if a is None or b is None or a.shape != b.shape:
                return None
            return a + b
        if op in ("pool", "reduce"):
            x_val = node.inputs[0]
            x = self.value(x_val, depth + 1)
            if x is None or x_val.shape is None or v.shape is None or len(x_val.shape) < 3:
                return None
            if op == "reduce" and (fn != "mean" or 0 in node.attrs.get("axes", []) or 1 in node.attrs.get("axes", [])):
                return None
            if op == "pool" and not ("max" in fn or "avg" in fn):
                return None
            k = max(1, _numel(x_val.shape[2:]) // max(1, _numel(v.shape[2:])))
            d = self.draws(x, k)
            return d.amax(0) if "max" in fn else d.mean(0)
        if op == "reshape":
            x_val = node.inputs[0]
            if x_val.shape and v.shape and len(v.shape) >= 2 and len(x_val.shape) >= 2 and v.shape[1] == x_val.shape[1] \
                    and _numel(x_val.shape[2:]) == 1:
                return self.value(x_val, depth + 1)
        return None


def input_moments(node: Node, tensors: Mapping[str, torch.Tensor], eps_of: Callable[[str], float] = lambda _: 1e-5,
                  seed: int = 0, samples: int = SAMPLES) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(E[x], E[x^2]) per channel (axis 1) of `node`'s first input from upstream BN statistics, or None."""
    bank = _Walk(tensors, eps_of, seed, samples).value(node.inputs[0])
    if bank is None:
        return None
    return bank.mean(0), bank.pow(2).mean(0)
