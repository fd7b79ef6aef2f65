"""Any Hugging Face causal LM whose weights no stock config describes: slimc's resized checkpoint format.

Structured pruning leaves decoder layers with different widths (query/KV heads, MLP or expert neurons,
experts), and FLAP's compensation adds biases to projections that had none. A stock config cannot say
that, so slimc writes the ORIGINAL architecture's config plus a record of what differs from the model
that config builds:

    "model_type": "slimc_resized",
    "architectures": ["SlimcResizedForCausalLM"],
    "auto_map": {"AutoConfig": "modeling_slimc_resized.SlimcResizedConfig",
                 "AutoModelForCausalLM": "modeling_slimc_resized.SlimcResizedForCausalLM"},
    "base_config": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, ...},
    "slimc_resize": {
        "format": "slimc-resize", "version": 1,
        "shapes": {"model.layers.0.self_attn.q_proj.weight": [32, 64], ...},    # parameters/buffers resized
        "new_parameters": {"model.layers.0.self_attn.o_proj.bias": [64]},       # exist only in this model
        "removed_parameters": [],                                               # set to None (e.g. a bias)
        "attributes": {"transformer.h.0.attn": {"num_heads": 3, "split_size": 24}}  # integer attributes
    }

and copies this file beside the weights. `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
calls `SlimcResizedForCausalLM.from_pretrained`, which builds the stock class of `base_config` (e.g.
`LlamaForCausalLM`) on the meta device, applies the record, lets transformers load the safetensors
weights (its key conversions, tied weights and buffer initialisation included), checks that every weight
fitted (missing, unexpected or mismatched keys raise `ValueError`), and returns that stock-class
instance in eval mode: `generate`, the KV cache and `save_pretrained` behave as for the stock model
(save_pretrained writes the stock config, which does not describe the new shapes: keep this config.json
beside such weights, or write the model with slimc.save).
`slimc.load(dir)` imports this module directly (never as remote code) and passes `prepare`, which swaps
N:M layers for packed ones after the resize and before the weights are read.

The file depends on `transformers` and `torch` only: it is shipped inside checkpoints.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

FORMAT = "slimc-resize"
VERSION = 1
RECORD_KEYS = ("shapes", "new_parameters", "removed_parameters", "attributes")
# hub keyword arguments that also locate the config when from_pretrained is given none
_HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


class SlimcResizedConfig(PretrainedConfig):
    """The original architecture's config (`base_config`, a config.json dict) and the resize record."""

    model_type = "slimc_resized"
    base_config: dict | None = None
    slimc_resize: dict | None = None

    def base(self) -> PretrainedConfig:
        """The stock config object of the original architecture."""
        return base_config(self.base_config or {})


def base_config(data: dict[str, Any]) -> PretrainedConfig:
    """A stock transformers config from a config.json dict (its `model_type` picks the class)."""
    data = dict(data)
    data.pop("auto_map", None)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError("base_config has no 'model_type'")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        raise ValueError(f"base_config model_type '{model_type}' is not known to this transformers version") from None
    return cls.from_dict(data)


def stock_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers class that builds `config`: its `architectures` entry when transformers has that
    class, else the causal-LM class registered for its config type."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


def check_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record with every key present; ValueError for another format or version."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"slimc_resize: expected format '{FORMAT}', got {record!r:.80}")
    if int(record.get("version", 0)) > VERSION:
        raise ValueError(f"slimc_resize version {record['version']} is newer than this file reads ({VERSION})")
    out = dict(record)
    for key in RECORD_KEYS:
        out.setdefault(key, [] if key == "removed_parameters" else {})
    return out


def _owner(model: nn.Module, name: str, what: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    try:
        return model.get_submodule(path), attr
    except AttributeError:
        raise ValueError(f"slimc_resize {what} '{name}', but {type(model).__name__} has no module '{path}'") from None


def resize(model: nn.Module, record: dict[str, Any]) -> list[str]:
    """Apply a resize record to a freshly built model (normally on the meta device), in place; returns the
    paths of the modules whose tensors were replaced or added.

    New tensors take the device and dtype of the ones they replace (a new parameter: of its module's
    other parameters); their values are whatever loading or initialisation writes next. A tensor held by
    several modules (tied weights) is replaced in all of them, so ties survive.
    """
    record = check_record(record)
    paths = {id(mod): path for path, mod in model.named_modules(remove_duplicate=False)}
    holders: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for mod in model.modules():
        for attr, t in mod._parameters.items():
            if t is not None:
                holders.setdefault(id(t), []).append((mod, attr, True))
        for attr, t in mod._buffers.items():
            if t is not None:
                holders.setdefault(id(t), []).append((mod, attr, False))
    touched: dict[str, None] = {}
    replaced: set[int] = set()
    for name, shape in record["shapes"].items():
        mod, attr = _owner(model, name, "resizes")
        old = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)
        if old is None:
            raise ValueError(f"slimc_resize resizes '{name}', which {type(model).__name__} does not have")
        if id(old) in replaced:  # a tied tensor already replaced under another name
            continue
        new = torch.empty([int(s) for s in shape], dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        replaced.add(id(old))
        for holder, key, is_param in holders[id(old)]:
            (holder._parameters if is_param else holder._buffers)[key] = new
            touched[paths[id(holder)]] = None
    for name, shape in record["new_parameters"].items():
        mod, attr = _owner(model, name, "adds")
        if mod._parameters.get(attr) is not None or attr in mod._buffers or (attr not in mod._parameters and hasattr(mod, attr)):
            raise ValueError(f"slimc_resize adds parameter '{name}', which {type(model).__name__} already has")
        ref = next(mod.parameters(recurse=False), None)
        ref = ref if ref is not None else next(model.parameters())
        mod.register_parameter(attr, nn.Parameter(torch.empty([int(s) for s in shape], dtype=ref.dtype, device=ref.device)))
        touched[paths[id(mod)]] = None
    for name in record["removed_parameters"]:
        mod, attr = _owner(model, name, "removes")
        if mod._parameters.get(attr) is None:
            raise ValueError(f"slimc_resize removes '{name}', which {type(model).__name__} does not have")
        mod._parameters[attr] = None
    for path, attrs in record["attributes"].items():
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"slimc_resize sets attributes of '{path}', which {type(model).__name__} does not have") from None
        for attr, value in attrs.items():
            if not hasattr(mod, attr):
                raise ValueError(f"slimc_resize sets '{path}.{attr}', which {type(mod).__name__} does not have")
            setattr(mod, attr, tuple(value) if isinstance(getattr(mod, attr), tuple) else value)
    return list(touched)


def _edited(stock: type[PreTrainedModel], edit: Callable[[nn.Module], None]) -> type[PreTrainedModel]:
    """A subclass of `stock` whose __init__ runs `edit(model)` once the stock __init__ has built every module.

    `from_pretrained` builds the model on the meta device, so the edit changes shapes before any weight is
    read; the subclass only carries the hook (callers set the instance's class back to `stock`).
    """

    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        stock.__init__(self, config, *args, **kwargs)
        edit(self)

    return type(stock.__name__, (stock,), {"__init__": __init__, "__module__": stock.__module__,
                                          "__qualname__": stock.__qualname__})


def _loading_problems(info: dict[str, Any]) -> str | None:
    """The first weight that did not fit, as a short text (None when all did)."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        first = mismatched[0]
        if isinstance(first, (tuple, list)) and len(first) == 3:
            key, stored, built = first
            return f"{key} is {list(stored)} in the checkpoint, {list(built)} in the model config.json describes"
        return f"{first} has another shape in the checkpoint than in the model config.json describes"

    def some(keys: Any) -> str:
        keys = sorted(keys)
        return f"{', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"

    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    if missing:
        return f"the checkpoint lacks {some(missing)}"
    if unexpected:
        return f"the model config.json describes has no {some(unexpected)}"
    errors = info.get("error_msgs") or []
    return str(errors[0]).strip().splitlines()[0] if errors else None


def load_edited(
    path: Any,
    config: PretrainedConfig,
    edit: Callable[[nn.Module], None] | None = None,
    *model_args: Any,
    stock: type[PreTrainedModel] | None = None,
    **kwargs: Any,
) -> PreTrainedModel | tuple[PreTrainedModel, dict[str, Any]]:
    """`stock.from_pretrained(path, config=config)` with `edit(model)` applied to the freshly built model
    before its weights are read, and every weight required to fit (ValueError otherwise).

    Returns an instance of `stock` itself (default: `stock_class(config)`), in eval mode; with
    `output_loading_info=True`, (model, info) as transformers returns them.
    """
    stock = stock or stock_class(config)
    want_info = kwargs.pop("output_loading_info", False)
    # mismatched shapes are collected (not raised as transformers' generic error) and reported below
    kwargs["ignore_mismatched_sizes"] = True
    frozen: list[str] = []

    def build(model: nn.Module) -> None:
        if edit is not None:
            edit(model)
        # transformers makes every loaded float parameter trainable; parameters built frozen (packed
        # N:M values) stay frozen
        frozen[:] = [n for n, p in model.named_parameters() if not p.requires_grad]

    model, info = _edited(stock, build).from_pretrained(path, *model_args, config=config, output_loading_info=True, **kwargs)
    model.__class__ = stock  # the subclass only carried the hook; the instance is the stock model
    problem = _loading_problems(info)
    if problem:
        raise ValueError(problem)
    params = dict(model.named_parameters())
    for name in frozen:
        if name in params:
            params[name].requires_grad_(False)
    model.eval()
    return (model, info) if want_info else model


class SlimcResizedForCausalLM(PreTrainedModel):
    """Loads a resized checkpoint as the stock model of its `base_config` (this class is never instantiated)."""

    config_class = SlimcResizedConfig

    def __init__(self, config: SlimcResizedConfig, *args: Any, **kwargs: Any):
        raise TypeError("SlimcResizedForCausalLM builds no model of its own: use from_pretrained / from_config, "
                        "which return the stock model of config.base_config")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Any,
        *model_args: Any,
        config: SlimcResizedConfig | None = None,
        prepare: Callable[[nn.Module], None] | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """The stock model of `config.base_config`, resized by `config.slimc_resize`, with the checkpoint's
        weights. `prepare(model)` (optional) runs after the resize and before the weights are read."""
        if not isinstance(config, SlimcResizedConfig):
            hub = {k: kwargs[k] for k in _HUB_KEYS if k in kwargs}
            config = SlimcResizedConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        record = check_record(config.slimc_resize)
        if prepare is None and getattr(config, "slimc_sparsity", None):
            raise ValueError("this checkpoint holds N:M packed layers (slimc_sparsity), which need slimc's SparseLinear: "
                             "load it with slimc.load")

        def edit(model: nn.Module) -> None:
            resize(model, record)
            if prepare is not None:
                prepare(model)

        return load_edited(pretrained_model_name_or_path, config.base(), edit, *model_args, **kwargs)

    @classmethod
    def _from_config(cls, config: SlimcResizedConfig, **kwargs: Any) -> PreTrainedModel:
        """A randomly initialised stock model of `config.base_config`, resized by `config.slimc_resize`."""
        record = check_record(config.slimc_resize)
        base = config.base()
        stock = stock_class(base)
        touched: list[str] = []
        model = _edited(stock, lambda m: touched.extend(resize(m, record)))._from_config(base, **kwargs)
        model.__class__ = stock
        if next(model.parameters()).device.type != "meta":
            with torch.no_grad():
                for path in touched:  # the stock init ran before the resize: initialise what it replaced
                    model._init_weights(model.get_submodule(path))
        return model

    @classmethod
    def from_config(cls, config: SlimcResizedConfig, **kwargs: Any) -> PreTrainedModel:
        return cls._from_config(config, **kwargs)
