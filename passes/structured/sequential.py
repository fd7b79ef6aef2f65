"""Sequential least-squares compensation: refit each pruned layer to the dense model's outputs.

FLAP's mean bias (and `lsq` on dense statistics) assume a pruned layer sees the dense model's
inputs; after the first pruned layer it does not, and errors add up along the residual stream.
`sequential_lsq` walks the decoder once with two streams of hidden states — the dense model's and
the pruned model's — and, layer by layer, refits the attention's and then the MLP's output projection (o_proj, down_proj) so that, on the
calibration tokens, W' z + b best matches the dense W x (z: kept inputs computed by the already
pruned prefix, x: the dense inputs), then removes the layer's pruned units and moves on. Peak
memory: the two streams plus one layer's dense down_proj inputs.

Any unit set with an observable output projection works: nn.Linear or transformers' Conv1D (its
[in, out] weight is refitted along its input axis, 0), several MLP sets in one layer, layers
without units (both streams just move past them).
"""

from __future__ import annotations

import torch
from torch import nn

from slimc.compiler.calibration.layerwise import DecoderStream, input_hooks
from slimc.compiler.surgery import apply_plan
from slimc.passes.structured import compensation as fm
from slimc.passes.structured.units import Units


class CrossMoments:
    """Float64 sums for the mean and covariance of x, z and their cross-covariance."""

    def __init__(self) -> None:
        self.n = 0
        self.sx = self.sz = self.szz = self.sxz = None

    def add(self, x: torch.Tensor, z: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        z = z.reshape(-1, z.shape[-1]).float()
        # float32 products per batch, float64 across batches (as in calibration's Gram matrices)
        parts = (x.sum(0).double(), z.sum(0).double(), (z.T @ z).double(), (x.T @ z).double())
        if self.sx is None:
            self.sx, self.sz, self.szz, self.sxz = parts
        else:
            self.sx, self.sz, self.szz, self.sxz = (a + b for a, b in zip((self.sx, self.sz, self.szz, self.sxz), parts))
        self.n += x.shape[0]

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mx, mz = self.sx / self.n, self.sz / self.n
        return mx, mz, self.sxz / self.n - torch.outer(mx, mz), self.szz / self.n - torch.outer(mz, mz)


def _refit(linear: nn.Module, moments: CrossMoments, kept: torch.Tensor, ridge: float, in_axis: int = 1) -> None:
    mx, mz, cxz, czz = moments.moments()
    w_new, b = fm.lsq_cross(linear.weight.movedim(in_axis, -1), kept, mx, mz, cxz, czz, ridge)
    fm.set_input_columns(linear.weight, in_axis, kept, w_new)
    with torch.no_grad():
        bias = b.to(linear.weight.dtype)
        if linear.bias is None:
            linear.bias = nn.Parameter(bias, requires_grad=linear.weight.requires_grad)
        else:
            linear.bias.copy_(bias)  # b already includes what the old bias contributed via W x


def _kept_columns(units: Units, removed_units: torch.Tensor, width: int) -> torch.Tensor:
    keep = torch.ones(width, dtype=torch.bool)
    keep[units.out_index[removed_units].reshape(-1)] = False
    return keep.nonzero().squeeze(1)


@torch.no_grad()
def sequential_lsq(
    module: nn.Module,
    layers: list[tuple[Units, ...]],
    removed: dict[str, torch.Tensor],
    tokens: torch.LongTensor,
    *,
    ridge: float,
    batch_size: int = 8,
) -> None:
    """Prune `module` layer by layer, refitting each layer's output projections (see module doc).

    `layers` are `structured.units.decoder_units` of the unpruned module (per layer, its attention
    units, then its MLP units; every projection observable); `removed` maps each group's name to
    the units to remove.
    """
    by_layer: dict[int, list[Units]] = {}
    for units in layers:
        for u in units:
            by_layer.setdefault(u.layer, []).append(u)
    if not by_layer:
        return
    was_training = module.training
    module.eval()
    dense = DecoderStream.capture(module, tokens, batch_size)
    pruned = dense.fork()
    try:
        for i in range(max(by_layer) + 1):
            pair = by_layer.get(i, [])
            if not pair:  # nothing to refit: both streams move through the unchanged layer
                pruned.advance(i)
                dense.advance(i)
                continue
            projs = [module.get_submodule(u.out_proj) for u in pair]
            kept = [_kept_columns(u, removed[u.group.name], proj.weight.shape[u.in_axis]) for u, proj in zip(pair, projs)]
            # 1. dense stream through the dense layer: the projections' inputs and the next hidden states
            inputs: dict[str, list[torch.Tensor]] = {u.out_proj: [] for u in pair}
            with input_hooks(module, list(inputs), lambda name, x: inputs[name].append(x.detach())):
                dense_next = dense.run(i)
            # 2. attention, then MLP: fit on the pruned stream's kept channels, then drop the units
            for u, proj, k in zip(pair, projs, kept):
                cm = CrossMoments()
                for b, x in enumerate(inputs.pop(u.out_proj)):
                    cm.add(x, pruned.run_until(i, proj, b)[..., k])
                _refit(proj, cm, k, ridge, u.in_axis)
                apply_plan(module, {u.group: removed[u.group.name]})
            # 3. advance both streams
            pruned.advance(i)
            dense.advance(i, dense_next)
    finally:
        module.train(was_training)
