"""Hugging Face checkpoint emitter: safetensors + config.json (+ generation config, tokenizer).

The config is derived from the module's weight shapes at save time, so no pass has to keep it in
sync. When every decoder layer has the same widths and no extra biases, the result is a stock
config (`AutoModelForCausalLM.from_pretrained(OUT)` loads it). Otherwise config.json gets
`slimc_layers` (one dict per layer: heads, KV heads, MLP width, o_proj/down_proj bias), `auto_map`,
and `modeling_slimc_llama.py` is copied beside the weights (`trust_remote_code=True` or
`slimc.load`). Models holding N:M `SparseLinear` layers get `slimc_sparsity` (engineer E's format).

`write_hf` writes into a directory; `verify_hf` re-loads it and compares logits with the
in-memory model. `compiler/emit.save` wraps both in an atomic output directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SlimcError
from .model import Model

MODELING_FILE = Path(__file__).resolve().parent / "modeling_slimc_llama.py"
AUTO_MAP = {
    "AutoConfig": "modeling_slimc_llama.SlimcLlamaConfig",
    "AutoModelForCausalLM": "modeling_slimc_llama.SlimcLlamaForCausalLM",
}
LLAMA_TYPES = ("llama", "slimc_llama")


def _features(linear: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear-like module (nn.Linear or a SparseLinear without a dense weight)."""
    if hasattr(linear, "out_features") and hasattr(linear, "in_features"):
        return int(linear.out_features), int(linear.in_features)
    return tuple(linear.weight.shape)  # type: ignore[return-value]


def _has_bias(linear: nn.Module) -> bool:
    return getattr(linear, "bias", None) is not None


def layer_specs(module: nn.Module, head_dim: int) -> list[dict[str, Any]]:
    """Per decoder layer: widths read from weight shapes, and whether o_proj/down_proj have biases."""
    from .llm import _layers

    _, layers = _layers(module)
    specs = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        q_out, _ = _features(attn.q_proj)
        k_out, _ = _features(attn.k_proj)
        _, inter = _features(mlp.down_proj)
        specs.append({
            "num_attention_heads": q_out // head_dim,
            "num_key_value_heads": k_out // head_dim,
            "intermediate_size": inter,
            "o_proj_bias": _has_bias(attn.o_proj),
            "down_proj_bias": _has_bias(mlp.down_proj),
        })
    return specs


def _qkv_bias(module: nn.Module) -> set[bool]:
    from .llm import _layers

    _, layers = _layers(module)
    out = set()
    for layer in layers:
        out |= {_has_bias(getattr(layer.self_attn, n)) for n in ("q_proj", "k_proj", "v_proj")}
    return out


def _gate_up_bias(module: nn.Module) -> set[bool]:
    from .llm import _layers

    _, layers = _layers(module)
    return {_has_bias(getattr(layer.mlp, n)) for layer in layers for n in ("gate_proj", "up_proj")}


def _is_llama_like(module: nn.Module) -> bool:
    from .llm import _layers

    try:
        _, layers = _layers(module)
    except SlimcError:
        return False
    return all(
        hasattr(getattr(layer, "self_attn", None), "q_proj") and hasattr(getattr(layer, "mlp", None), "down_proj")
        for layer in layers
    )


def derive_config(model: Model) -> tuple[dict[str, Any], bool]:
    """(config.json dict, per_layer) for the model as it is now."""
    module, config = model.module, model.config
    data = config.to_dict()
    data.pop("auto_map", None)
    data["architectures"] = [type(module).__name__]
    if not (model.is_causal_lm and _is_llama_like(module)):
        return data, False
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    specs = layer_specs(module, head_dim)
    qkv, gate_up = _qkv_bias(module), _gate_up_bias(module)
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


def _sparse_config(module: nn.Module) -> dict[str, Any] | None:
    if importlib.util.find_spec("slimc.compiler.sparse_linear") is None:
        return None
    return importlib.import_module("slimc.compiler.sparse_linear").sparse_config(module)


def write_hf(model: Model, out_dir: Path) -> dict[str, Any]:
    """Write the checkpoint into the existing directory `out_dir`. Returns what was written."""
    if model.module is None or model.config is None:
        raise SlimcError("the HF format needs a Hugging Face model (config + module); use --format onnx or pt2")
    if not hasattr(model.module, "save_pretrained"):
        raise SlimcError(f"{type(model.module).__name__} is not a transformers model; use --format onnx or pt2")
    data, per_layer = derive_config(model)
    sparse = _sparse_config(model.module)
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


def sample_ids(model: Model, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 0) or 100)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


@torch.no_grad()
def logits(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(iter(module.parameters()), torch.empty(0)).device
    return module(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def verify_hf(model: Model, out_dir: Path, atol: float = 1e-4) -> dict[str, Any]:
    """Re-load what was written and compare its logits with the in-memory model (max abs diff < atol)."""
    from .loaders import load_hf_dir

    if not model.is_causal_lm:
        raise SlimcError("only causal LMs are verified after HF emission; this model is not one")
    reloaded = load_hf_dir(out_dir)
    ids = sample_ids(model)
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
