"""Hugging Face checkpoint emitter: safetensors + config.json (+ generation config, tokenizer).

The config is derived from the module at save time, so no pass has to keep it in sync. When a stock
config builds exactly the module's tensors (every decoder layer has the same widths and no extra
biases, or nothing was pruned; the widths are found for any family by rewriting width-like config
keys and building the result on the meta device), config.json is that stock config and
`AutoModelForCausalLM.from_pretrained(OUT)` loads it. Otherwise (per-layer widths, added biases, on any
architecture) config.json is slimc's resized form (`runtime/modeling_slimc_resized.py`): the original
config as `base_config`, and `slimc_resize`, the differences between the module and a fresh one built from
that config on the meta device (tensor shapes, parameters only the pruned model has, integer module
attributes such as GPT-2's `num_heads`), found by comparing the two; the modeling file is copied beside
the weights (`trust_remote_code=True` or `slimc.load`). Models holding N:M `SparseLinear` layers get
`slimc_sparsity` (`runtime/sparse_linear.sparse_config`); the record describes them as the dense
`nn.Linear` they replace, so the two compose.

`write_hf` writes into a directory; `verify_hf` re-loads it and compares logits with the
in-memory model. `compiler/emit/save.save` wraps both in an atomic output directory.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimc.compiler.analysis.llm import DecoderLayerView, recognised_layers
from slimc.compiler.model import Model, first_tensor
from slimc.errors import SlimcError
from slimc.runtime import modeling_slimc_resized as resized
from slimc.runtime.sparse_linear import SparseLinear, sparse_config

MODELING_FILE = Path(resized.__file__)
AUTO_MAP = {
    "AutoConfig": "modeling_slimc_resized.SlimcResizedConfig",
    "AutoModelForCausalLM": "modeling_slimc_resized.SlimcResizedForCausalLM",
}


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


# ---------------------------------------------------------------- comparing a module with its config


@dataclass
class Signature:
    """What a config must reproduce of a module: module types, tensor shapes, integer attributes."""

    modules: dict[str, type] = field(default_factory=dict)
    tensors: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # name -> (shape, kind)
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)


def _int_like(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_int_like(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _int_scalar(value: Any) -> bool:
    return _int_like(value) and not isinstance(value, (tuple, list))


def signature(module: nn.Module) -> Signature:
    """The module's structure. A `SparseLinear` counts as the dense `nn.Linear` it packs (its weight
    [out, in], its bias), so a resize record describes dense layers and `slimc_sparsity` applies on top."""
    sig = Signature()
    skip: list[str] = []
    for path, mod in module.named_modules():
        if any(path.startswith(s + ".") for s in skip):
            continue
        pre = f"{path}." if path else ""
        if isinstance(mod, SparseLinear):
            skip.append(path)
            sig.modules[path] = nn.Linear
            sig.tensors[f"{pre}weight"] = ((mod.out_features, mod.in_features), "parameter")
            if mod.bias is not None:
                sig.tensors[f"{pre}bias"] = ((mod.out_features,), "parameter")
            sig.attributes[path] = {"in_features": mod.in_features, "out_features": mod.out_features}
            continue
        sig.modules[path] = type(mod)
        for name, t in mod._parameters.items():
            if t is not None:
                sig.tensors[pre + name] = (tuple(t.shape), "parameter")
        for name, t in mod._buffers.items():
            if t is not None:
                kind = "non-persistent buffer" if name in mod._non_persistent_buffers_set else "buffer"
                sig.tensors[pre + name] = (tuple(t.shape), kind)
        sig.attributes[path] = {k: v for k, v in vars(mod).items() if not k.startswith("_") and _int_like(v)}
    return sig


def _meta_build(data: dict[str, Any]) -> nn.Module:
    """The module the loader builds for a config.json dict, on the meta device (no memory, no init)."""
    config = resized.base_config(data)
    cls = resized.stock_class(config)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls._from_config(config)


def resize_record(module: nn.Module, built: nn.Module) -> dict[str, Any]:
    """How `module` differs from `built` (the model its base config builds), as a `slimc_resize` record;
    SlimcError for a difference a record cannot express (a module of another type, an added module,
    a buffer added, removed or resized that the checkpoint does not carry)."""
    ours, theirs = signature(module), signature(built)
    arch = type(built).__name__

    def refuse(why: str) -> SlimcError:
        return SlimcError(f"slimc cannot write this checkpoint: {why}, which the {arch} config cannot be resized to describe")

    for path, cls in theirs.modules.items():
        if path not in ours.modules:
            raise refuse(f"module '{path}' was removed")
        if not issubclass(ours.modules[path], cls):
            raise refuse(f"module '{path}' is a {ours.modules[path].__name__}, not a {cls.__name__}")
    extra = [p for p in ours.modules if p not in theirs.modules]
    if extra:
        raise refuse(f"module '{extra[0]}' was added")
    shapes: dict[str, list[int]] = {}
    new: dict[str, list[int]] = {}
    removed: list[str] = []
    for name, (shape, kind) in theirs.tensors.items():
        if name not in ours.tensors:
            if kind != "parameter":
                raise refuse(f"{kind} '{name}' was removed")
            removed.append(name)
        elif ours.tensors[name][0] != shape:
            if kind == "non-persistent buffer":
                raise refuse(f"non-persistent buffer '{name}' (not in the checkpoint) changed shape")
            shapes[name] = list(ours.tensors[name][0])
    for name, (shape, kind) in ours.tensors.items():
        if name not in theirs.tensors:
            if kind != "parameter":
                raise refuse(f"{kind} '{name}' was added")
            new[name] = list(shape)
    attributes: dict[str, dict[str, Any]] = {}
    for path, attrs in theirs.attributes.items():
        changed = {k: ours.attributes[path][k] for k, v in attrs.items()
                   if k in ours.attributes[path] and ours.attributes[path][k] != v}
        if changed:
            attributes[path] = {k: list(v) if isinstance(v, tuple) else v for k, v in changed.items()}
    if not (shapes or new or removed or attributes):
        return {}
    return {"format": resized.FORMAT, "version": resized.VERSION, "shapes": shapes, "new_parameters": new,
            "removed_parameters": removed, "attributes": attributes}


def _stock_name(module: nn.Module) -> str:
    """The first transformers class in the module's MRO (a subclass of ours, e.g. the old per-layer
    SlimcLlamaForCausalLM, is written as the stock class it extends)."""
    import transformers

    for cls in type(module).__mro__:
        if getattr(transformers, cls.__name__, None) is cls:
            return cls.__name__
    return type(module).__name__


def base_dict(model: Model) -> dict[str, Any]:
    """The model's config as a stock config.json dict (an old `slimc_llama` config becomes `llama`)."""
    data = model.config.to_dict()
    data.pop("auto_map", None)
    data.pop("_name_or_path", None)  # where it was last loaded from: a local path, not part of the architecture
    if data.get("model_type") == "slimc_llama":
        data["model_type"] = "llama"
        data.pop("slimc_layers", None)
    data["architectures"] = [_stock_name(model.module)]
    data["dtype"] = str(next(model.module.parameters()).dtype).removeprefix("torch.")
    return data


def _stock_candidate(model: Model, data: dict[str, Any]) -> dict[str, Any]:
    """`data` with a Llama-style model's widths set when every decoder layer has the same ones."""
    module, config = model.module, model.config
    data = dict(data)
    views = recognised_layers(model)
    if not views:
        return data
    specs = layer_specs(module, views)
    qkv = _biases(module, views, "attn", ("q_proj", "k_proj", "v_proj"))
    gate_up = _biases(module, views, "mlp", ("gate_proj", "up_proj"))
    attention_bias, mlp_bias = bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))
    first = specs[0]
    uniform = (
        all(s == first for s in specs)
        and qkv == {attention_bias} and first["o_proj_bias"] == attention_bias
        and gate_up == {mlp_bias} and first["down_proj_bias"] == mlp_bias
        and first["num_attention_heads"] > 0 and first["intermediate_size"] > 0
        and config.hidden_size % first["num_attention_heads"] == 0  # transformers validates this
    )
    if uniform:
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            data[key] = first[key]
        data["head_dim"] = views[0].head_dim
    return data


# config keys that can state a decoder width (MLP width, head counts); others are never rewritten
WIDTH_KEY_HINTS = ("inner", "intermediate", "ffn", "head", "kv", "expert", "moe")
MAX_STOCK_TRIALS = 64


def _stock_fits(module: nn.Module, data: dict[str, Any]) -> bool:
    """Whether the config dict builds exactly the module's tensors (attributes aside: the surgery may
    leave one stale that forward never reads, e.g. LlamaMLP.intermediate_size; the reload check
    compares logits)."""
    try:
        diff = resize_record(module, _meta_build(data))
    except Exception:  # noqa: BLE001 — the candidate widths build another structure, or nothing
        return False
    return not any(diff.get(k) for k in ("shapes", "new_parameters", "removed_parameters"))


def _width_changes(module: nn.Module, built: nn.Module) -> dict[int, int] | None:
    """original size -> new size of every tensor axis that changed, or None when one original size
    became several (per-layer widths: no stock config can state them)."""
    ours, theirs = signature(module), signature(built)
    changes: dict[int, set[int]] = {}
    for name, (shape, _) in theirs.tensors.items():
        mine = ours.tensors.get(name)
        if mine is None or mine[0] == shape or len(mine[0]) != len(shape):
            continue
        for old, now in zip(shape, mine[0]):
            if old != now:
                changes.setdefault(old, set()).add(now)
    if any(len(v) > 1 for v in changes.values()):
        return None
    return {old: next(iter(v)) for old, v in changes.items()}


def _generic_stock_candidate(model: Model, data: dict[str, Any], built: nn.Module) -> dict[str, Any] | None:
    """A stock config for a uniformly pruned model of any family, or None (`built`: what `data` builds).

    Each changed axis (original size d -> d') proposes, for every width-like integer key of the config
    whose value v divides d, the value d' / (d / v) (v = 1536 neurons, d = 1536 -> 1229; v = 9 heads,
    d = 9 x 64 -> 6 heads); keys left unset (GPT-2's n_inner, a derived head_dim) may take d' or the
    value the built modules hold under that name. Combinations are tried, most keys changed first, and one is accepted only when its meta-device build has exactly the
    module's tensors, so a coincidental divisor cannot produce a wrong config."""
    import itertools

    changes = _width_changes(model.module, built)
    if not changes:
        return None
    built_attrs = signature(built).attributes
    options: dict[str, list[Any]] = {}
    for key, v in data.items():
        if not any(h in key.lower() for h in WIDTH_KEY_HINTS):
            continue
        if v is None:
            # an unset key takes a new width, or the value the built modules hold under its name
            # (Llama's head_dim, derived as hidden / heads, must be stated once the heads change)
            held = {a[key] for a in built_attrs.values() if key in a and _int_scalar(a[key])}
            values = sorted(set(changes.values()) | held)
        elif _int_scalar(v) and v > 0:
            values = sorted({new // (old // v) for old, new in changes.items() if old % v == 0 and new % (old // v) == 0})
            values = [x for x in values if x != v and x > 0]
        else:
            continue
        if values:
            options[key] = values
    keys = list(options)
    if len(keys) > 8:
        return None
    combos = itertools.product(*[[None, *options[k]] for k in keys])
    ranked = sorted(combos, key=lambda c: -sum(x is not None for x in c))[:MAX_STOCK_TRIALS]
    for combo in ranked:
        if all(x is None for x in combo):
            break
        candidate = dict(data)
        candidate.update({k: x for k, x in zip(keys, combo) if x is not None})
        if _stock_fits(model.module, candidate):
            return candidate
    return None


def derive_config(model: Model) -> tuple[dict[str, Any], bool]:
    """(config.json dict, resized) for the model as it is now: a stock config when one builds exactly
    the module's tensors, else the resized form (`base_config` + `slimc_resize` + `auto_map`)."""
    data = base_dict(model)
    candidate = _stock_candidate(model, data) if model.is_causal_lm else data
    if _stock_fits(model.module, candidate):
        return candidate, False
    try:
        built = _meta_build(data)
    except Exception:  # noqa: BLE001 — a config transformers cannot build here
        # nothing to compare with: write the config as it is and let the reload check judge it
        return candidate, False
    generic = _generic_stock_candidate(model, data, built)
    if generic is not None:
        return generic, False
    if not model.is_causal_lm:  # the resized form (per-layer widths) is a causal-LM class
        raise SlimcError(f"this {type(model.module).__name__} was pruned to widths its stock config cannot state (per-layer widths, "
                         "or heads that no longer divide hidden_size); the hf format holds those for causal LMs only: use --format onnx or pt2")
    record = resize_record(model.module, built)
    return {
        "model_type": resized.SlimcResizedConfig.model_type,
        "architectures": [resized.SlimcResizedForCausalLM.__name__],
        "auto_map": dict(AUTO_MAP),
        "base_config": data,
        "slimc_resize": record,
        "dtype": data["dtype"],
    }, True


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
        "config": "slimc_resized (trust_remote_code or slimc.load)" if per_layer else "stock",
        "sparsity": sparse,
        "tokenizer": model.tokenizer is not None,
    }


@torch.no_grad()
def logits(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(iter(module.parameters()), torch.empty(0)).device
    return module(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def verify_hf(model: Model, out_dir: Path, atol: float = 1e-4) -> dict[str, Any]:
    """Re-load what was written and compare its outputs with the in-memory model (max abs diff < atol):
    a causal LM's logits on probe ids, an encoder's first output (its hidden states) on its example inputs."""
    from slimc.compiler.frontends.loaders import load_hf_dir

    if model.is_causal_lm:
        ids = model.probe_ids()
        run, shapes, check, what = (lambda m: logits(m, ids)), list(ids.shape), "reload + logits", "logits"
    elif model.example_inputs:
        inputs = model.example_inputs
        run, shapes, check, what = (lambda m: _first_output(m, inputs)), {k: list(v.shape) for k, v in inputs.items()}, \
            "reload + first output", "outputs"
    else:
        raise SlimcError("this Hugging Face model is neither a causal LM nor has example inputs (a tokenizer makes them "
                         "for encoders); it cannot be verified after writing: save its tokenizer beside it")
    reloaded = load_hf_dir(out_dir)
    was_training = model.module.training
    model.module.eval()
    try:
        ref = run(model.module)
    finally:
        model.module.train(was_training)
    got = run(reloaded.module)
    diff = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
    tied_in = _tied(model.module)
    tied_out = _tied(reloaded.module)
    result = {
        "check": check,
        "inputs": shapes,
        "max_abs_diff": diff,
        "atol": atol,
        "tied_embeddings": tied_out,
        "params_reloaded": reloaded.num_parameters(),
        "ok": diff < atol and tied_in == tied_out,
    }
    if not result["ok"]:
        if not bool(torch.isfinite(ref).all()):  # NaN never equals NaN: nothing can be verified
            why = f"the model's own {what} are not finite (NaN or Inf), so no output can be compared"
        elif diff >= atol or diff != diff:
            why = f"max abs {what[:-1]} diff {diff:.3g} >= {atol:g}"  # "logit" / "output"
        else:
            why = "tied embeddings came back untied"
        raise SlimcError(f"the written checkpoint does not reproduce the model ({why}); nothing was written")
    return result


def _first_output(module: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return first_tensor(module(**inputs)).float().cpu()


def _tied(module: nn.Module) -> bool:
    emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    return emb is not None and head is not None and emb.weight is head.weight
