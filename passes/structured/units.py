"""Prunable units of a decoder LLM, layer by layer, with their real parameter cost.

    layers = decoder_units(model)
    for units in layers:        # one tuple per decoder layer: its attention units first, then its MLP units
        for u in units:
            u.kind              # ATTN | MLP
            u.group             # attention.kv_group / attention.head (one KV head and its G query heads),
                                # mlp.neuron, moe.expert_neuron (neuron j of every expert at once)
            u.out_proj          # "model.layers.3.self_attn.o_proj": the projection whose input channels the units own
            u.in_axis           # that weight's input axis: 1 for nn.Linear [out, in], 0 for transformers' Conv1D [in, out]
            u.out_index         # [units, k] those input entries (G * head_dim per KV group, 1 per neuron)
            u.cost              # parameters removed with one unit (`Group.numel_per_channel` on the weights' shapes)
            u.observable        # the projection's forward input carries the units' channels on its last axis
    layers.whole                # what is left whole, per layer, with the reason

Units come from `compiler.analysis.llm.decoder_layer_groups`: the coupled-dimension analysis on
one exported decoder layer per distinct layer signature (its example inputs captured here by
`DecoderStream` on a few tokens), or, for unambiguous Llama-style layers, their names. A KV group
of a fused QKV projection, a GPT-2 Conv1D head or an MoE expert neuron is a unit like any other.
MoE expert neurons live in 3-D expert tensors that no linear's forward input carries, so they are
not `observable`: criteria that need input statistics and compensation cannot use them.

A layer with neither attention nor MLP units is a `SlimcError` naming the layer and the reasons;
a layer where only one part has units keeps the other whole (listed in `whole`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from slimc.compiler.analysis.llm import ATTN, MLP, LayerGroups, decoder_layer_groups, output_projection
from slimc.compiler.calibration.layerwise import DecoderStream
from slimc.compiler.groups import Group
from slimc.compiler.model import Model
from slimc.errors import SlimcError

__all__ = ["ATTN", "MLP", "Units", "DecoderUnits", "decoder_units", "out_weight"]

EXAMPLE_TOKENS = 5  # tokens the decoder layers are exported on (shapes only; any ids do)


@dataclass
class Units:
    """The prunable units of one group (attention or MLP) of one decoder layer."""

    layer: int
    kind: str  # ATTN | MLP
    group: Group
    out_proj: str  # module path of the projection whose input channels the units own
    out_index: torch.Tensor  # [size, k] entries along `in_axis` of `out_param` owned by each unit
    cost: int  # parameters per unit
    in_axis: int = 1  # input axis of the projection's weight (1: nn.Linear [out, in], 0: Conv1D [in, out])
    out_param: str = ""  # the projection's weight; default f"{out_proj}.weight"
    observable: bool = True  # the projection is a linear whose forward input is the units' channels

    def __post_init__(self) -> None:
        if not self.out_param:
            self.out_param = f"{self.out_proj}.weight"

    @property
    def size(self) -> int:
        return self.group.size


class DecoderUnits(list):
    """One tuple of `Units` per decoder layer (attention first), plus what is left whole and why."""

    def __init__(self, layers=(), whole: list[dict[str, Any]] | None = None, groups: list[LayerGroups] | None = None):
        super().__init__(layers)
        self.whole: list[dict[str, Any]] = whole or []  # {"layer", "part", "name", "role", "size", "reason"}
        self.groups: list[LayerGroups] = groups or []  # the analysis' view of every layer


def out_weight(u: Units, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The output projection's weight as [d_out, d_in] (a view: Conv1D's [in, out] transposed)."""
    w = tensors[u.out_param]
    return w if u.in_axis % w.dim() == w.dim() - 1 else w.movedim(u.in_axis, -1)


def _example(module: nn.Module, config: Any):
    """The hidden states and keyword arguments decoder layer 0 receives on a few tokens."""

    def make() -> tuple[torch.Tensor, dict[str, Any]]:
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        if vocab <= 0:
            emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
            vocab = int(getattr(emb, "num_embeddings", 2) or 2)
        ids = torch.arange(EXAMPLE_TOKENS, dtype=torch.long)[None, :] % vocab
        was_training = module.training
        module.eval()
        try:
            stream = DecoderStream.capture(module, ids, batch_size=1)
        finally:
            module.train(was_training)
        if not stream.hidden:
            raise SlimcError("the model never reached its first decoder layer on example tokens")
        return stream.hidden[0], stream.kwargs[0]

    return make


def decoder_units(model: Model | nn.Module, *, strict: bool = True, use_names: bool = True) -> DecoderUnits:
    """The units of every decoder layer; see the module docstring.

    `strict=False` (inspection, postconditions) keeps a layer without units as an empty tuple
    instead of raising; `use_names=False` finds every layer's units through the IR.
    """
    module = model.module if isinstance(model, Model) else model
    config = model.config if isinstance(model, Model) else getattr(module, "config", None)
    if module is None:
        raise SlimcError("decoder units need a PyTorch model (this one was loaded from ONNX)")
    analysed = decoder_layer_groups(model, _example(module, config), use_names=use_names)
    shapes = {n: p.shape for n, p in module.named_parameters(remove_duplicate=False)}
    out = DecoderUnits(groups=analysed)
    for lg in analysed:
        units: list[Units] = []
        for kind, groups in ((ATTN, lg.attention), (MLP, lg.mlp)):
            for g in groups:
                proj = output_projection(g, module)
                if proj is None:
                    out.whole.append({"layer": lg.index, "part": kind, "name": g.name, "role": g.role, "size": g.size,
                                      "reason": f"{g.name} owns the input channels of no projection"})
                    continue
                units.append(Units(lg.index, kind, g, proj.module, proj.index, g.numel_per_channel(shapes),
                                   proj.in_axis, proj.param, proj.observable))
        for w in lg.whole:
            if not any(u.kind == w.kind for u in units) or w.size == 1:  # MQA's single KV head is listed anyway
                out.whole.append({"layer": lg.index, "part": w.kind, "name": w.name, "role": w.role, "size": w.size, "reason": w.reason})
        if strict and not units:
            raise SlimcError(f"layer {lg.index} ({lg.prefix}): the analysis maps no prunable units: "
                             f"attention: {lg.reason(ATTN) or 'none'}; MLP: {lg.reason(MLP) or 'none'}")
        out.append(tuple(units))
    return out
