"""`magnitude`: remove the same fraction of MLP neurons in every decoder layer, by weight norm.

A data-free baseline. For each layer's MLP units (`structured.units.decoder_units`: gated or plain
MLP neurons, a shared expert's neurons, MoE expert neurons), neuron j's score is the L2 norm of
every weight it owns (`_group_magnitude_math.group_channel_norms`); for a gated MLP:

    s_j = sqrt(||W_gate[j, :]||^2 + ||W_up[j, :]||^2 + ||W_down[:, j]||^2)

and the floor(sparsity * I) lowest-scoring neurons are removed with `compiler.surgery.apply_plan` on
the unit group, the kept width rounded up to `multiple_of` and to the group's own multiple (expert
neurons: grouped_mm's 16-byte strides). Attention is untouched. A layer whose MLP the analysis
cannot map is left whole and listed in `stats["left_whole"]`.

Recipe:

    name: magnitude-20
    passes:
      - magnitude: {sparsity: 0.2}
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from slimc.compiler.groups import Group
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import NEEDS_DECODER_LM, Pass, PassConfig, PassContext, PassResult, register_pass
from slimc.compiler.surgery import apply_plan
from slimc.errors import PostconditionError
from slimc.passes._group_magnitude_math import group_channel_norms
from slimc.passes._magnitude_math import lowest, prune_count
from slimc.passes.structured.units import MLP, decoder_units


class MagnitudeConfig(PassConfig):
    sparsity: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of MLP neurons removed in every layer")
    multiple_of: int = Field(1, ge=1, description="round each kept MLP width up to a multiple of this")


@register_pass
class Magnitude(Pass):
    name = "magnitude"
    description = "Remove a uniform fraction of MLP neurons per layer by weight L2 norm (data-free)"
    Config = MagnitudeConfig

    stage = "structure"

    def needs(self) -> frozenset[str]:
        return frozenset({NEEDS_DECODER_LM})

    def plan(self, model: Model) -> tuple[dict[Group, list[int]], dict[str, Any]]:
        """({MLP group: neurons to remove}, stats); the model is not changed."""
        cfg: MagnitudeConfig = self.config
        layers = decoder_units(model)
        tensors = dict(model.module.named_parameters(remove_duplicate=False))
        plan: dict[Group, list[int]] = {}
        before = 0
        for units in layers:
            for u in units:
                if u.kind != MLP:
                    continue
                before += u.size
                n = prune_count(u.size, cfg.sparsity, math.lcm(cfg.multiple_of, u.group.multiple_of))
                if n:
                    plan[u.group] = lowest(group_channel_norms(u.group, tensors), n).tolist()
        removed = sum(len(v) for v in plan.values())
        stats: dict[str, Any] = {"neurons_removed": removed, "neurons_before": before, "sparsity": removed / before if before else 0.0}
        whole = [w for w in layers.whole if w["part"] == MLP]
        if whole:
            stats["left_whole"] = whole
        return plan, stats

    def call(self, model: Model, ctx: PassContext) -> PassResult:
        plan, info = self.plan(model)
        stats = apply_plan(model, plan, verify=False)  # units from the decoder recogniser are exact
        stats.update(info)
        return PassResult(model, modified=info["neurons_removed"] > 0, stats=stats)

    def ensures(self, model: Model, ctx: PassContext) -> None:
        for units in decoder_units(model, strict=False):
            for u in units:
                if u.kind == MLP and u.size < 1:
                    raise PostconditionError(f"layer {u.layer} lost every MLP neuron")
