"""Prunable units of a decoder LLM, layer by layer, with their real parameter cost.

    for attn, mlp in decoder_units(model):
        attn.group      # Group of role attention.kv_group / attention.head: one KV head and its G query heads
        attn.out_proj   # "model.layers.3.self_attn.o_proj": the projection whose input columns the units own
        attn.out_index  # [units, k] those columns (G * head_dim per KV group)
        attn.cost       # parameters removed with one unit (read from the weights' shapes)

MLP units are neurons (a gate row, an up row and a down column for a gated MLP). Units come from
the decoder recogniser (`compiler.analysis.llm.decoder_layers`), so the sizes are right after
surgery too (per-layer widths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimc.compiler.analysis.llm import decoder_layers
from slimc.compiler.groups import Group
from slimc.compiler.model import Model
from slimc.errors import SlimcError

ATTN, MLP = "attn", "mlp"


@dataclass
class Units:
    """The prunable units of one module kind (attention or MLP) of one decoder layer."""

    layer: int
    kind: str  # ATTN | MLP
    group: Group
    out_proj: str  # module path of the projection whose input columns the units own
    out_index: torch.Tensor  # [size, k] input columns of out_proj owned by each unit
    cost: int  # parameters per unit

    @property
    def size(self) -> int:
        return self.group.size


def input_columns(group: Group, param: str) -> torch.Tensor:
    """index [units, k] of the input columns (axis 1) of weight `param` owned by each unit of `group`."""
    for s in group.slices:
        if s.param == param and s.axis == 1:
            return s.index
    raise SlimcError(f"group {group.name} owns no input columns of {param}")


def decoder_units(model: Model) -> list[tuple[Units, Units]]:
    """(attention units, MLP units) of every decoder layer."""
    shapes = {n: p.shape for n, p in model.module.named_parameters(remove_duplicate=False)}
    out = []
    for v in decoder_layers(model):
        pair = []
        for kind, group, proj in ((ATTN, v.kv_group, f"{v.attn}.o_proj"), (MLP, v.mlp_neuron, f"{v.mlp}.down_proj")):
            pair.append(Units(v.index, kind, group, proj, input_columns(group, f"{proj}.weight"), group.numel_per_channel(shapes)))
        out.append((pair[0], pair[1]))
    return out
