"""Hugging Face checkpoint emitter: safetensors + config.json (+ generation config, tokenizer).

The config is derived from the module's weight shapes at save time, so no pass has to keep it in
sync. When every decoder layer has the same widths and no extra biases, the result is a stock
config (`AutoModelForCausalLM.from_pretrained(OUT)` loads it). Otherwise config.json gets
`slimc_layers` (one dict per layer: heads, KV heads, MLP width, o_proj/down_proj bias), `auto_map`,
and `runtime/modeling_slimc_llama.py` is copied beside the weights (`trust_remote_code=True` or
`slimc.load`). Models holding N:M `SparseLinear` layers get `slimc_sparsity` (`runtime/sparse_linear.sparse_config`).

`write_hf` writes into a directory; `verify_hf` re-loads it and compares logits with the
in-memory model. `compiler/emit/save.save` wraps both in an atomic output directory.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimc.compiler.analysis.llm import DecoderLayerView, recognised_layers
from slimc.compiler.model import Model
from slimc.errors import SlimcError
from slimc.runtime import modeling_slimc_llama
from slimc.runtime.sparse_linear import sparse_config

MODELING_FILE = Path(modeling_slimc_llama.__file__)
AUTO_MAP = {
    "AutoConfig": "modeling_slimc_llama.SlimcLlamaConfig",
    "AutoModelForCausalLM": "modeling_slimc_llama.SlimcLlamaForCausalLM",
}
LLAMA_TYPES = ("llama", "slimc_llama")


def _has_bias(linear: nn.Module) -> bool:
    return getattr(linear, "bias", None) is not None


def layer_specs(module: nn.Module, views: list[DecoderLayerView]) -> list[dict[str, Any]]:
    """Per decoder layer: widths read from weight shapes, and whether o_proj/down_proj have biases."""
    return [
        {
            "num_attention_heads": v.num_heads,
            "num_key_value_heads": v.num_kv_heads,
            "intermediate_size": v.intermediate_size,
            "o_proj_bias": _has_bias(module.get_submodule(f"{v.attn}.o_proj")),
            "down_proj_bias": _has_bias(module.get_submodule(f"{v.mlp}.down_proj")),
        }
        for v in views
    ]


def _biases(module: nn.Module, views: list[DecoderLayerView], prefix: str, names: tuple[str, ...]) -> set[bool]:
    """Whether the named projections (under each layer's `prefix`: attn or mlp) have biases, over all layers."""
    return {_has_bias(module.get_submodule(f"{getattr(v, prefix)}.{n}")) for v in views for n in names}


def derive_config(model: Model) -> tuple[dict[str, Any], bool]:
    """(config.json dict, per_layer) for the model as it is now."""
    module, config = model.module, model.config
    data = config.to_dict()
    data.pop("auto_map", None)
    data["architectures"] = [type(module).__name__]
    data["dtype"] = str(next(module.parameters()).dtype).removeprefix("torch.")
    views = recognised_layers(model) if model.is_causal_lm else None
    if not views:
        return data, False
    head_dim = views[0].head_dim
    specs = layer_specs(module, views)
    qkv = _biases(module, views, "attn", ("q_proj", "k_proj", "v_proj"))
    gate_up = _biases(module, views, "mlp", ("gate_proj", "up_proj"))
    attention_bias, mlp_bias = bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))
    if len(qkv) > 1 or len(gate_up) > 1:
        raise SlimcError("some layers have q/k/v (or gate/up) biases and others not; slimc cannot write that checkpoint")
    first = specs[0]
    uniform = (
        all(s == first for s in specs)
        and qkv == {attention_bias} and first["o_proj_bias"] == attention_bias
        and gate_up == {mlp_bias} and first["down_proj_bias"] == mlp_bias
        and first["num_attention_heads"] > 0 and first["intermediate_size"] > 0
        and config.hidden_size % first["num_attention_heads"] == 0  # transformers validates this
    )
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if uniform:
            data[key] = first[key]
    data["head_dim"] = head_dim
    if uniform:
        if data.get("model_type") == "slimc_llama":  # a per-layer model pruned back to uniform
            data["model_type"] = "llama"
            data["architectures"] = ["LlamaForCausalLM"]
            data.pop("slimc_layers", None)
        return data, False
    if data.get("model_type") not in LLAMA_TYPES:
        raise SlimcError(
            f"per-layer widths are written only for Llama-family models, not model_type '{data.get('model_type')}'"
        )
    if qkv != {attention_bias}:
        data["attention_bias"] = next(iter(qkv))
    if gate_up != {mlp_bias}:
        data["mlp_bias"] = next(iter(gate_up))
    data.update(
        model_type="slimc_llama",
        architectures=["SlimcLlamaForCausalLM"],
        auto_map=dict(AUTO_MAP),
        slimc_layers=specs,
    )
    return data, True


def write_hf(model: Model, out_dir: Path) -> dict[str, Any]:
    """Write the checkpoint into the existing directory `out_dir`. Returns what was written."""
    if model.module is None or model.config is None:
        raise SlimcError("the HF format needs a Hugging Face model (config + module); use --format onnx or pt2")
    if not hasattr(model.module, "save_pretrained"):
        raise SlimcError(f"{type(model.module).__name__} is not a transformers model; use --format onnx or pt2")
    data, per_layer = derive_config(model)
    sparse = sparse_config(model.module)
    if sparse:
        data["slimc_sparsity"] = sparse
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.module.save_pretrained(str(out_dir))
    # save_pretrained wrote the in-memory config, which may predate pruning: replace it
    (out_dir / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if per_layer:
        shutil.copyfile(MODELING_FILE, out_dir / MODELING_FILE.name)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out_dir))
    return {
        "format": "hf",
        "per_layer": per_layer,
        "config": "slimc_llama (trust_remote_code or slimc.load)" if per_layer else "stock",
        "sparsity": sparse,
        "tokenizer": model.tokenizer is not None,
    }


@torch.no_grad()
def logits(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(iter(module.parameters()), torch.empty(0)).device
    return module(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def verify_hf(model: Model, out_dir: Path, atol: float = 1e-4) -> dict[str, Any]:
    """Re-load what was written and compare its logits with the in-memory model (max abs diff < atol)."""
    from slimc.compiler.frontends.loaders import load_hf_dir

    if not model.is_causal_lm:
        raise SlimcError("only causal LMs are verified after HF emission; this model is not one")
    reloaded = load_hf_dir(out_dir)
    ids = model.probe_ids()
    was_training = model.module.training
    model.module.eval()
    try:
        ref = logits(model.module, ids)
    finally:
        model.module.train(was_training)
    got = logits(reloaded.module, ids)
    diff = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
    tied_in = _tied(model.module)
    tied_out = _tied(reloaded.module)
    result = {
        "check": "reload + logits",
        "inputs": list(ids.shape),
        "max_abs_diff": diff,
        "atol": atol,
        "tied_embeddings": tied_out,
        "params_reloaded": reloaded.num_parameters(),
        "ok": diff < atol and tied_in == tied_out,
    }
    if not result["ok"]:
        why = f"max abs logit diff {diff:.3g} >= {atol:g}" if diff >= atol else "tied embeddings came back untied"
        raise SlimcError(f"the written checkpoint does not reproduce the model ({why}); nothing was written")
    return result


def _tied(module: nn.Module) -> bool:
    emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    return emb is not None and head is not None and emb.weight is head.weight
