"""`group-magnitude`: remove the lowest-norm channels of every coupled group, on any model.

Groups come from the coupled-dimension analysis (`compiler.analysis.coupling.find_groups`) on the graph
IR, so the pass runs on ONNX files (`compiler.frontends.import_onnx`) and on PyTorch models
(`compiler.frontends.import_torch`) alike, with one surgery (`compiler.surgery.apply_plan`): an attention
KV group, a gated-MLP neuron, a conv channel through residual adds, concats and depthwise convs.
In each prunable, exact group of `size` channels, floor(sparsity * size) channels with the lowest

    s_c = sqrt( sum over the group's slices of || weights channel c owns ||^2 )

are removed (`_group_magnitude_math`), keeping at least one channel and, where the group asks, a
multiple of `Group.multiple_of`. Data-free; no compensation. When it removes nothing, the stat
`nothing_removed` says why (no prunable group and what blocks them, the roles filter, the rounding),
and the report and the console repeat it.

Recipe:

    name: group-magnitude-25
    passes:
      - group-magnitude: {sparsity: 0.25, roles: [mlp.neuron, attention.kv_group]}
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from slimc.compiler.analysis.coupling import model_groups, why_nothing_prunable
from slimc.compiler.groups import Group
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import Pass, PassConfig, PassContext, PassResult, register_pass
from slimc.compiler.surgery import apply_plan
from slimc.errors import SlimcError
from slimc.passes._group_magnitude_math import group_channel_norms
from slimc.passes._magnitude_math import lowest, prune_count


class GroupMagnitudeConfig(PassConfig):
    sparsity: float = Field(0.25, ge=0.0, lt=1.0, description="fraction of each group's channels removed")
    roles: list[str] | None = Field(None, description="only groups with these roles (e.g. mlp.neuron, "
                                    "attention.kv_group, conv.channel); every role when omitted")
    min_size: int = Field(2, ge=2, description="groups with fewer channels are left whole")


def model_tensors(model: Model) -> dict[str, torch.Tensor]:
    """The tensors group slices name: ONNX initializers, or the module's parameters and buffers."""
    if model.is_onnx:
        return {n: torch.from_numpy(np.array(v.const_value.numpy())) for n, v in model.onnx.graph.initializers.items()
                if v.const_value is not None}
    tensors = dict(model.module.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.module.named_buffers(remove_duplicate=False)))
    return tensors


@register_pass
class GroupMagnitude(Pass):
    name = "group-magnitude"
    description = "Remove the lowest-norm channels of every coupled group (any model, ONNX or PyTorch; data-free)"
    Config = GroupMagnitudeConfig
    stage = "structure"

    def requires(self, model: Model, ctx: PassContext) -> None:
        if model.onnx is None and model.module is None:
            raise SlimcError("group-magnitude needs a model (ONNX or PyTorch); this one is empty")

    def call(self, model: Model, ctx: PassContext) -> PassResult:
        cfg: GroupMagnitudeConfig = self.config
        groups, tensors = model_groups(model), model_tensors(model)
        plan: dict[Group, list[int]] = {}
        for g in groups:
            if not g.prunable or not g.exact or g.size < cfg.min_size:
                continue
            if cfg.roles is not None and g.role not in cfg.roles:
                continue
            n = prune_count(g.size, cfg.sparsity, getattr(g, "multiple_of", 1))
            if n:
                plan[g] = lowest(group_channel_norms(g, tensors), n).tolist()
        stats = apply_plan(model, plan)
        eligible = [g for g in groups if g.prunable and g.exact and g.size >= cfg.min_size
                    and (cfg.roles is None or g.role in cfg.roles)]
        stats.update(
            groups_found=len(groups), groups_pruned=len(plan), channels_removed=sum(len(v) for v in plan.values()),
            channels_eligible=sum(g.size for g in eligible),
        )
        if not plan:
            stats["nothing_removed"] = _why_empty(groups, eligible, cfg)
        return PassResult(model, modified=bool(plan), stats=stats)


def _why_empty(groups: list[Group], eligible: list[Group], cfg: GroupMagnitudeConfig) -> str:
    """Why the plan is empty, in one line for the report and the console."""
    why = why_nothing_prunable(groups)
    if why:
        return why
    if not eligible:
        usable = [g for g in groups if g.prunable and g.exact]
        roles = sorted({g.role for g in usable})
        wanted = f"of the roles {', '.join(cfg.roles)} " if cfg.roles is not None else ""
        return (f"no prunable, exact group {wanted}with at least {cfg.min_size} channels "
                f"({len(usable)} prunable exact groups, of roles {', '.join(roles) or 'none'})")
    largest = max(g.size for g in eligible)
    return f"sparsity {cfg.sparsity:g} rounds to no channel in the {len(eligible)} eligible groups (the largest has {largest})"
