"""A Llama whose decoder layers may differ in width: the Llama-only per-layer checkpoint form.

slimc now writes every per-layer checkpoint, Llama included, in the generic resized form
(`runtime/modeling_slimc_resized.py`: the original config plus a record of what differs, loaded as the
stock class). Checkpoints written in this older form still load, through `slimc.load` (which imports
this module directly) or `trust_remote_code=True` (the copy shipped beside their weights). Their
config.json reads

    "model_type": "slimc_llama",
    "slimc_layers": [{"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 1229,
                      "o_proj_bias": true, "down_proj_bias": true}, ...],
    "auto_map": {"AutoConfig": "modeling_slimc_llama.SlimcLlamaConfig",
                 "AutoModelForCausalLM": "modeling_slimc_llama.SlimcLlamaForCausalLM"}

and every layer is built with its own shapes. The file depends on `transformers` only (it is shipped
into checkpoints). Saving such a model again with slimc writes the resized form, with
`LlamaForCausalLM` as the base.

A layer whose attention lost every head (or whose MLP lost every neuron) keeps its residual path:
the block adds only its bias (or nothing), which is what the pruned in-memory model computes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

LAYER_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "o_proj_bias", "down_proj_bias")


class SlimcLlamaConfig(LlamaConfig):
    """`LlamaConfig` plus `slimc_layers`: one dict of widths and extra biases per decoder layer."""

    model_type = "slimc_llama"

    def validate_architecture(self) -> None:
        # Per-layer head counts need not divide hidden_size: head_dim is explicit.
        if getattr(self, "head_dim", None) is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError("head_dim must be given when hidden_size is not a multiple of num_attention_heads")
        layers = getattr(self, "slimc_layers", None)
        if layers is not None and len(layers) != self.num_hidden_layers:
            raise ValueError(f"slimc_layers has {len(layers)} entries for {self.num_hidden_layers} layers")


def _spec(config: LlamaConfig, index: int) -> dict:
    layers = getattr(config, "slimc_layers", None)
    return dict(layers[index]) if layers else {}


def layer_config(config: LlamaConfig, index: int) -> LlamaConfig:
    """A shallow copy of `config` carrying layer `index`'s widths."""
    spec = _spec(config, index)
    cfg = copy.copy(config)
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if key in spec:
            object.__setattr__(cfg, key, int(spec[key]))
    return cfg


class _NoAttention(nn.Module):
    """Attention with every head pruned: contributes its o_proj bias (or zero) to the residual."""

    def __init__(self, hidden_size: int, bias: bool):
        super().__init__()
        self.o_proj = nn.Linear(0, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states.new_zeros(hidden_states.shape[:-1] + (self.o_proj.out_features,))
        if self.o_proj.bias is not None:
            out = out + self.o_proj.bias
        return out, None


def build_layer(config: LlamaConfig, index: int) -> LlamaDecoderLayer:
    """One decoder layer with its own widths, and biases on o_proj/down_proj where recorded."""
    spec = _spec(config, index)
    cfg = layer_config(config, index)
    heads = cfg.num_attention_heads
    if heads == 0:
        # LlamaAttention divides by the KV head count; build it with one head, then replace it.
        object.__setattr__(cfg, "num_attention_heads", 1)
        object.__setattr__(cfg, "num_key_value_heads", 1)
    layer = LlamaDecoderLayer(cfg, index)
    attn, mlp = layer.self_attn, layer.mlp
    o_bias = bool(spec.get("o_proj_bias", config.attention_bias))
    d_bias = bool(spec.get("down_proj_bias", config.mlp_bias))
    if heads == 0:
        layer.self_attn = _NoAttention(config.hidden_size, o_bias)
    elif o_bias != (attn.o_proj.bias is not None):
        attn.o_proj = nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features, bias=o_bias)
    if d_bias != (mlp.down_proj.bias is not None):
        mlp.down_proj = nn.Linear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=d_bias)
    return layer


class SlimcLlamaModel(LlamaModel):
    config_class = SlimcLlamaConfig

    def __init__(self, config: SlimcLlamaConfig):
        super().__init__(config)
        self.layers = nn.ModuleList([build_layer(config, i) for i in range(config.num_hidden_layers)])
        self.post_init()


class SlimcLlamaForCausalLM(LlamaForCausalLM):
    config_class = SlimcLlamaConfig

    def __init__(self, config: SlimcLlamaConfig):
        super().__init__(config)
        self.model = SlimcLlamaModel(config)
        self.post_init()
