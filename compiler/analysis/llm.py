"""Recogniser for Hugging Face decoder LLMs: per-layer attention KV groups and MLP neurons.

LLM passes (FLAP, CFSP, NIRVANA, ...) ask for units by role, layer by layer:

    for layer in decoder_layers(model):
        layer.kv_group    # Group, role attention.kv_group: KV head j + its G query heads
        layer.mlp_neuron  # Group, role mlp.neuron: gate row j, up row j, down column j

A KV-group channel owns G*head_dim rows of q_proj (and their bias), head_dim rows of k_proj and
v_proj, and G*head_dim columns of o_proj: the query heads that read a KV head stay with it, so
GQA stays GQA (for MHA, G = 1 and a unit is one head). head_dim is never split, which keeps
RoPE's (i, i + d/2) pairs whole. Sizes are read from the module's current weights, so the view is
right after surgery too (per-layer widths).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slimc.compiler.groups import Group, Role, Slice, block_index
from slimc.compiler.model import Model
from slimc.errors import SlimcError


@dataclass
class DecoderLayerView:
    index: int
    prefix: str  # module path of the decoder layer, e.g. "model.layers.3"
    attn: str  # "model.layers.3.self_attn"
    mlp: str  # "model.layers.3.mlp"
    head_dim: int
    group_size: int  # G: query heads per KV head
    num_kv_heads: int
    intermediate_size: int
    kv_group: Group
    mlp_neuron: Group

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.group_size


def find_layer_list(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(path, ModuleList) of a decoder's layers, or None when the model has no such list."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        try:
            layers = module.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    return None


def _layers(module: nn.Module) -> tuple[str, nn.ModuleList]:
    found = find_layer_list(module)
    if found is not None:
        return found
    raise SlimcError("not a decoder LLM slimc recognises: no model.layers list of decoder layers")


def _rows(param: str, size: int, width: int, axis: int, has: bool = True) -> list[Slice]:
    return [Slice(param, axis, block_index(size, width))] if has else []


def decoder_layers(model: Model | nn.Module) -> list[DecoderLayerView]:
    """One view per decoder layer of a Llama-style model (separate q/k/v/o and gate/up/down)."""
    module = model.module if isinstance(model, Model) else model
    config = model.config if isinstance(model, Model) else getattr(module, "config", None)
    path, layers = _layers(module)
    views = []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise SlimcError(f"layer {i}: expected self_attn.{{q,k,v,o}}_proj (Llama-style attention); fused QKV is not supported by this recogniser")
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise SlimcError(f"layer {i}: expected mlp.{{gate,up,down}}_proj (gated MLP)")
        head_dim = int(getattr(attn, "head_dim", 0) or config.head_dim)
        n_kv = attn.k_proj.weight.shape[0] // head_dim
        n_q = attn.q_proj.weight.shape[0] // head_dim
        if n_kv == 0 or n_q % n_kv:
            raise SlimcError(f"layer {i}: {n_q} query heads do not split evenly over {n_kv} KV heads")
        G = n_q // n_kv
        a, m = f"{path}.{i}.self_attn", f"{path}.{i}.mlp"
        kv_slices = [
            *_rows(f"{a}.q_proj.weight", n_kv, G * head_dim, 0),
            *_rows(f"{a}.q_proj.bias", n_kv, G * head_dim, 0, attn.q_proj.bias is not None),
            *_rows(f"{a}.k_proj.weight", n_kv, head_dim, 0),
            *_rows(f"{a}.k_proj.bias", n_kv, head_dim, 0, attn.k_proj.bias is not None),
            *_rows(f"{a}.v_proj.weight", n_kv, head_dim, 0),
            *_rows(f"{a}.v_proj.bias", n_kv, head_dim, 0, attn.v_proj.bias is not None),
            *_rows(f"{a}.o_proj.weight", n_kv, G * head_dim, 1),
        ]
        inter = mlp.down_proj.weight.shape[1]
        mlp_slices = [
            *_rows(f"{m}.gate_proj.weight", inter, 1, 0),
            *_rows(f"{m}.gate_proj.bias", inter, 1, 0, mlp.gate_proj.bias is not None),
            *_rows(f"{m}.up_proj.weight", inter, 1, 0),
            *_rows(f"{m}.up_proj.bias", inter, 1, 0, mlp.up_proj.bias is not None),
            *_rows(f"{m}.down_proj.weight", inter, 1, 1),
        ]
        role = Role.KV_GROUP if G > 1 else Role.HEAD
        views.append(
            DecoderLayerView(
                index=i,
                prefix=f"{path}.{i}",
                attn=a,
                mlp=m,
                head_dim=head_dim,
                group_size=G,
                num_kv_heads=n_kv,
                intermediate_size=inter,
                kv_group=Group(f"{a}:kv_group", n_kv, kv_slices, role, i),
                mlp_neuron=Group(f"{m}:neuron", inter, mlp_slices, Role.MLP_NEURON, i),
            )
        )
    return views


def recognised_layers(model: Model | nn.Module) -> list[DecoderLayerView] | None:
    """`decoder_layers`, or None when the model is not a decoder this recogniser knows."""
    try:
        return decoder_layers(model)
    except SlimcError:
        return None
