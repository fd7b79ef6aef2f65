"""Sequential least-squares compensation: refit each pruned layer to the dense model's outputs.

FLAP's mean bias (and `lsq` on dense statistics) assume a pruned layer sees the dense model's
inputs; after the first pruned layer it does not, and errors add up along the residual stream.
`sequential_lsq` walks the decoder once with two streams of hidden states — the dense model's and
the pruned model's — and, layer by layer, refits o_proj and then down_proj so that, on the
calibration tokens, W' z + b best matches the dense W x (z: kept inputs computed by the already
pruned prefix, x: the dense inputs), then removes the layer's pruned units and moves on. Peak
memory: the two streams plus one layer's dense down_proj inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from slimc.compiler.calibration.layerwise import DecoderStream, input_hooks
from slimc.compiler.groups import Group
from slimc.compiler.surgery import apply_plan
from slimc.passes import _flap_math as fm


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


def _refit(linear: nn.Linear, moments: CrossMoments, kept: torch.Tensor, ridge: float) -> None:
    mx, mz, cxz, czz = moments.moments()
    w_new, b = fm.lsq_cross(linear.weight, kept, mx, mz, cxz, czz, ridge)
    with torch.no_grad():
        linear.weight[:, kept] = w_new.to(linear.weight.dtype)
        bias = b.to(linear.weight.dtype)
        if linear.bias is None:
            linear.bias = nn.Parameter(bias, requires_grad=linear.weight.requires_grad)
        else:
            linear.bias.copy_(bias)  # b already includes what the old bias contributed via W x


def _kept_columns(group: Group, linear_param: str, removed_units: torch.Tensor, width: int) -> torch.Tensor:
    index = next(s.index for s in group.slices if s.param == linear_param and s.axis == 1)
    keep = torch.ones(width, dtype=torch.bool)
    keep[index[removed_units].reshape(-1)] = False
    return keep.nonzero().squeeze(1)


@torch.no_grad()
def sequential_lsq(
    module: nn.Module,
    views: list,
    plan: dict,
    tokens: torch.LongTensor,
    *,
    ridge: float,
    batch_size: int = 8,
) -> None:
    """Prune `module` by `plan` layer by layer, refitting each o_proj and down_proj (see module doc).

    `views` are `compiler.analysis.llm.decoder_layers` of the unpruned module; `plan` maps groups to
    removed units and is matched to the views by group name.
    """
    was_training = module.training
    module.eval()
    dense = DecoderStream.capture(module, tokens, batch_size)
    pruned = dense.fork()
    by_name = {g.name: (g, idx) for g, idx in plan.items()}
    try:
        for v in views:
            i = v.index
            attn = module.get_submodule(v.attn)
            mlp = module.get_submodule(v.mlp)
            (a_group, a_rm), (m_group, m_rm) = by_name[v.kv_group.name], by_name[v.mlp_neuron.name]
            a_kept = _kept_columns(v.kv_group, f"{v.attn}.o_proj.weight", a_rm, attn.o_proj.weight.shape[1])
            m_kept = _kept_columns(v.mlp_neuron, f"{v.mlp}.down_proj.weight", m_rm, mlp.down_proj.weight.shape[1])
            # 1. dense stream through the dense layer: o_proj / down_proj inputs and the next hidden states
            inputs: dict[str, list[torch.Tensor]] = {"o": [], "d": []}
            names = {f"{v.attn}.o_proj": "o", f"{v.mlp}.down_proj": "d"}
            with input_hooks(module, list(names), lambda name, x: inputs[names[name]].append(x.detach())):
                dense_next = dense.run(i)
            # 2. o_proj: fit on the pruned stream's kept attention channels, then drop the KV groups
            cm = CrossMoments()
            for b, x in enumerate(inputs.pop("o")):
                cm.add(x, pruned.run_until(i, attn.o_proj, b)[..., a_kept])
            _refit(attn.o_proj, cm, a_kept, ridge)
            apply_plan(module, {a_group: a_rm})
            # 3. down_proj: same, with the attention already pruned
            cm = CrossMoments()
            for b, x in enumerate(inputs.pop("d")):
                cm.add(x, pruned.run_until(i, mlp.down_proj, b)[..., m_kept])
            _refit(mlp.down_proj, cm, m_kept, ridge)
            apply_plan(module, {m_group: m_rm})
            # 4. advance both streams
            pruned.advance(i)
            dense.advance(i, dense_next)
    finally:
        module.train(was_training)
