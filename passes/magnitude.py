"""`magnitude`: remove the same fraction of MLP neurons in every decoder layer, by weight norm.

A data-free baseline. For each layer, neuron j's score is the L2 norm of its gate row, up row and
down column together (`_magnitude_math.neuron_norms`):

    s_j = sqrt(||W_gate[j, :]||^2 + ||W_up[j, :]||^2 + ||W_down[:, j]||^2)

and the floor(sparsity * I) lowest-scoring neurons are removed with `compiler.surgery.apply_plan` on
the layer's `mlp.neuron` group. Attention is untouched.

Recipe:

    name: magnitude-20
    passes:
      - magnitude: {sparsity: 0.2}
"""

from __future__ import annotations

from pydantic import Field

from slimc.compiler.analysis.llm import decoder_layers
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import NEEDS_DECODER_LM, Pass, PassConfig, PassContext, PassResult, register_pass
from slimc.compiler.surgery import apply_plan
from slimc.errors import PostconditionError
from slimc.passes._magnitude_math import lowest, neuron_norms, prune_count


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

    def call(self, model: Model, ctx: PassContext) -> PassResult:
        cfg: MagnitudeConfig = self.config
        plan = {}
        before = 0
        for view in decoder_layers(model):
            mlp = model.module.get_submodule(view.mlp)
            before += view.intermediate_size
            n = prune_count(view.intermediate_size, cfg.sparsity, cfg.multiple_of)
            if n:
                scores = neuron_norms(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
                plan[view.mlp_neuron] = lowest(scores, n).tolist()
        removed = sum(len(v) for v in plan.values())
        stats = apply_plan(model, plan)
        stats.update(neurons_removed=removed, neurons_before=before, sparsity=removed / before if before else 0.0)
        return PassResult(model, modified=removed > 0, stats=stats)

    def ensures(self, model: Model, ctx: PassContext) -> None:
        for view in decoder_layers(model):
            if view.intermediate_size < 1:
                raise PostconditionError(f"layer {view.index} lost every MLP neuron")
