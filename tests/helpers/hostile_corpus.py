"""A corpus of broken and hostile inputs, built in code (nothing downloaded), one `Case` each.

Every case builds its input files under a fresh directory and gives the `compress` arguments that
read them. The test (`tests/hostile/test_corpus.py`) runs each through the command line and requires: exit
status 2, exactly one `error:` line that names the offending file (`Case.names`) and matches
`Case.expect`, no traceback, nothing at OUT, no temporary directory left beside it, and every input
file byte-identical afterwards. Cases with a `marker` also prove that no code from the input ran:
their payload would create that path.

The table of cases with the error line each prints is kept in TESTING.md (see test_corpus.py).
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

TINY_FLAP = ["--recipe", "flap-20", "--set", "flap.samples=2", "--set", "flap.seq_len=8"]


@dataclass
class Base:
    """Valid inputs the cases start from: a tiny Llama checkpoint dir (with a tokenizer) and its tensors."""

    hf: Path
    tensors: dict[str, torch.Tensor]


@dataclass
class Case:
    name: str
    area: str
    what: str
    build: Callable[[Path, Base], list[str]]  # writes under the given dir, returns the compress arguments
    expect: str  # a regular expression the error line must match (case-insensitive)
    names: str = ""  # text the error line must contain (the offending file or option); "" = the first argument's name
    marker: str | None = None  # a path (relative to the case dir) that exists only if code from the input ran


CASES: list[Case] = []


def case(name: str, area: str, what: str, expect: str, names: str = "", marker: str | None = None):
    def register(fn: Callable[[Path, Base], list[str]]):
        CASES.append(Case(name, area, what, fn, expect, names, marker))
        return fn

    return register


# ---------------------------------------------------------------- helpers


ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def safetensors_bytes(tensors: dict[str, torch.Tensor], edit_header=None, edit_data=None, raw_header: bytes | None = None) -> bytes:
    """A safetensors file written by hand, so that every field can be made wrong on purpose."""
    header: dict = {}
    blobs, offset = [], 0
    for key, t in tensors.items():
        blob = t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    if edit_header is not None:
        edit_header(header)
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = b"".join(blobs)
    if edit_data is not None:
        data = edit_data(data)
    return struct.pack("<Q", len(text)) + text + data


def hf_copy(d: Path, base: Base, *, weights: bool = True) -> Path:
    """A copy of the tiny checkpoint dir (config, tokenizer, optionally the weights) under d/model."""
    out = d / "model"
    shutil.copytree(base.hf, out, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
    return out


def with_weights(d: Path, base: Base, data: bytes) -> list[str]:
    model = hf_copy(d, base, weights=False)
    (model / "model.safetensors").write_bytes(data)
    return [str(model), "--recipe", "identity"]


def edit_config(d: Path, base: Base, edit) -> list[str]:
    model = hf_copy(d, base)
    cfg = json.loads((model / "config.json").read_text())
    edit(cfg)
    (model / "config.json").write_text(json.dumps(cfg))
    return [str(model), "--recipe", "identity"]


def first_weight(base: Base) -> str:
    return next(k for k in base.tensors if k.endswith("q_proj.weight"))


class MarkerPayload:
    """Unpickling this creates the directory `path`: proof that the pickle's code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


# ---------------------------------------------------------------- safetensors


@case("st-tiny", "safetensors", "a file of 5 bytes", r"truncated", names="model.safetensors")
def _(d, base):
    return with_weights(d, base, b"\x01\x02\x03\x04\x05")


@case("st-header-past-end", "safetensors", "header length larger than the file", r"header .*cut off|truncated", names="model.safetensors")
def _(d, base):
    return with_weights(d, base, struct.pack("<Q", 10_000) + b"{}")


@case("st-header-bomb", "safetensors", "a header of 200 MB (a header bomb; sparse file)", r"header of \d+ bytes|too large", names="model.safetensors")
def _(d, base):
    model = hf_copy(d, base, weights=False)
    n = 200_000_000
    with open(model / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n + 8)  # sparse: costs no disk
    return [str(model), "--recipe", "identity"]


@case("st-bad-json", "safetensors", "header that is not JSON", r"not valid JSON", names="model.safetensors")
def _(d, base):
    return with_weights(d, base, safetensors_bytes(base.tensors, raw_header=b'{"a": [1, 2'))


@case("st-not-utf8", "safetensors", "header bytes that are not UTF-8", r"not valid JSON|UTF-8", names="model.safetensors")
def _(d, base):
    return with_weights(d, base, safetensors_bytes(base.tensors, raw_header=b"\xff\xfe\xfd{}"))


@case("st-header-list", "safetensors", "header is a JSON list, not an object", r"header", names="model.safetensors")
def _(d, base):
    return with_weights(d, base, safetensors_bytes(base.tensors, raw_header=b"[1, 2, 3]"))


@case("st-entry-fields", "safetensors", "a tensor entry without data_offsets", r"entry|data_offsets", names="model.safetensors")
def _(d, base):
    return with_weights(d, base, safetensors_bytes(base.tensors, edit_header=lambda h: h[first_weight(base)].pop("data_offsets")))


@case("st-unknown-dtype", "safetensors", "an unknown dtype", r"dtype", names="model.safetensors")
def _(d, base):
    return with_weights(d, base, safetensors_bytes(base.tensors, edit_header=lambda h: h[first_weight(base)].update(dtype="F99")))


@case("st-offsets-out-of-range", "safetensors", "data_offsets past the end of the data", r"truncated|past the end|out of range", names="model.safetensors")
def _(d, base):
    def edit(h):
        b, e = h[first_weight(base)]["data_offsets"]
        h[first_weight(base)]["data_offsets"] = [b + 10**9, e + 10**9]

    return with_weights(d, base, safetensors_bytes(base.tensors, edit_header=edit))


@case("st-offsets-reversed", "safetensors", "data_offsets with begin after end", r"offsets", names="model.safetensors")
def _(d, base):
    def edit(h):
        b, e = h[first_weight(base)]["data_offsets"]
        h[first_weight(base)]["data_offsets"] = [e, b]

    return with_weights(d, base, safetensors_bytes(base.tensors, edit_header=edit))


@case("st-offsets-overlap", "safetensors", "two tensors whose bytes overlap", r"overlap", names="model.safetensors")
def _(d, base):
    keys = [k for k in base.tensors if k.endswith(("q_proj.weight", "k_proj.weight"))][:2]

    def edit(h):
        h[keys[1]]["data_offsets"] = list(h[keys[0]]["data_offsets"])
        h[keys[1]]["data_offsets"][1] = h[keys[1]]["data_offsets"][0] + 4 * int(np.prod(h[keys[1]]["shape"]))

    return with_weights(d, base, safetensors_bytes(base.tensors, edit_header=edit))


@case("st-shape-vs-bytes", "safetensors", "shape x dtype disagrees with the byte count", r"shape|bytes", names="model.safetensors")
def _(d, base):
    return with_weights(d, base, safetensors_bytes(base.tensors, edit_header=lambda h: h[first_weight(base)].update(shape=[3, 3])))


@case("st-negative-shape", "safetensors", "a negative dimension", r"shape", names="model.safetensors")
def _(d, base):
    return with_weights(d, base, safetensors_bytes(base.tensors, edit_header=lambda h: h[first_weight(base)].update(shape=[-64, -64])))


@case("st-truncated-data", "safetensors", "the file cut in the middle of the tensor data", r"truncated", names="model.safetensors")
def _(d, base):
    full = safetensors_bytes(base.tensors)
    return with_weights(d, base, full[: len(full) // 2])


@case("st-missing-tensor", "safetensors", "a tensor the config needs is absent", r"missing", names="model.safetensors")
def _(d, base):
    t = dict(base.tensors)
    t.pop(first_weight(base))
    return with_weights(d, base, safetensors_bytes(t))


@case("st-extra-tensor", "safetensors", "a tensor the config does not have", r"unexpected|not in the model", names="model.safetensors")
def _(d, base):
    return with_weights(d, base, safetensors_bytes({**base.tensors, "model.layers.7.evil.weight": torch.zeros(2, 2)}))


@case("st-shape-vs-config", "safetensors", "a tensor whose shape differs from the config's", r"do not match|shape", names="model.safetensors")
def _(d, base):
    t = dict(base.tensors)
    k = first_weight(base)
    t[k] = torch.zeros(t[k].shape[0] // 2, t[k].shape[1])
    return with_weights(d, base, safetensors_bytes(t))


@case("st-nan-weights", "safetensors", "NaN and Inf weights (warned, and verification refuses to call NaN equal)", r"not finite|NaN", names="")
def _nan_weights(d, base):
    t = dict(base.tensors)
    k = first_weight(base)
    t[k] = t[k].clone()
    t[k][0, 0] = float("nan")
    t[k][1, 1] = float("inf")
    return with_weights(d, base, safetensors_bytes(t))


@case("st-nan-weights-pt2", "safetensors", "NaN and Inf weights written as .pt2 (the reload check must not call NaN equal)",
      r"not finite|by inf", names="")
def _(d, base):
    return [*_nan_weights(d, base), "--format", "pt2"]


@case("st-metadata-not-mapping", "safetensors", "__metadata__ that is a list, not a string map", r"__metadata__|metadata", names="model.safetensors")
def _(d, base):
    return with_weights(d, base, safetensors_bytes(base.tensors, edit_header=lambda h: h.update(__metadata__=[1, 2])))


@case("st-zero-length", "safetensors", "an empty (0-byte) weights file", r"truncated|only 0 bytes", names="model.safetensors")
def _(d, base):
    return with_weights(d, base, b"")


# ---------------------------------------------------------------- Hugging Face directories


@case("hf-empty-dir", "hf", "an empty directory", r"without config\.json", names="model")
def _(d, base):
    (d / "model").mkdir()
    return [str(d / "model"), "--recipe", "identity"]


@case("hf-config-not-json", "hf", "config.json is not JSON", r"not valid JSON", names="config.json")
def _(d, base):
    model = hf_copy(d, base)
    (model / "config.json").write_text("{model_type: llama")
    return [str(model), "--recipe", "identity"]


@case("hf-config-binary", "hf", "config.json holds binary bytes", r"not valid JSON|UTF-8", names="config.json")
def _(d, base):
    model = hf_copy(d, base)
    (model / "config.json").write_bytes(bytes(range(256)) * 4)
    return [str(model), "--recipe", "identity"]


@case("hf-config-list", "hf", "config.json is a JSON list", r"expected a JSON object", names="config.json")
def _(d, base):
    model = hf_copy(d, base)
    (model / "config.json").write_text("[1, 2]")
    return [str(model), "--recipe", "identity"]


@case("hf-no-model-type", "hf", "config.json without model_type", r"model_type", names="config.json")
def _(d, base):
    return edit_config(d, base, lambda c: c.pop("model_type"))


@case("hf-unknown-model-type", "hf", "an architecture transformers does not know", r"model_type", names="config.json")
def _(d, base):
    return edit_config(d, base, lambda c: c.update(model_type="no-such-arch"))


@case("hf-config-wrong-types", "hf", "config values of the wrong type", r"config", names="config.json")
def _(d, base):
    return edit_config(d, base, lambda c: c.update(num_hidden_layers="two", hidden_size=[64]))


@case("hf-config-absurd-size", "hf", "config asks for a 10^12-wide model (must not try to allocate it)", r"do not match|shape|config", names="config.json")
def _(d, base):
    return edit_config(d, base, lambda c: c.update(intermediate_size=10**12))


@case("hf-remote-code-config", "hf", "config.json auto_map points to code in the checkpoint", r"--trust-remote-code", names="config.json", marker="ran")
def _(d, base):
    model = hf_copy(d, base)
    (model / "modeling_evil.py").write_text(f"import os\nos.makedirs({str(d / 'ran')!r}, exist_ok=True)\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="evil", auto_map={"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"})
    (model / "config.json").write_text(json.dumps(cfg))
    return [str(model), "--recipe", "identity"]


@case("hf-remote-code-tokenizer", "hf", "a tokenizer that needs code from the checkpoint", r"--trust-remote-code|--tokenizer", names="tokenizer_config.json", marker="ran")
def _(d, base):
    model = hf_copy(d, base)
    (model / "tokenization_evil.py").write_text(f"import os\nos.makedirs({str(d / 'ran')!r}, exist_ok=True)\n")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json",):
        (model / f).unlink(missing_ok=True)
    return [str(model), "--recipe", "identity"]


@case("hf-missing-shard", "hf", "a shard the index lists is missing", r"missing", names="model-00002-of-00002.safetensors")
def _(d, base):
    model = hf_copy(d, base, weights=False)
    keys = list(base.tensors)
    half = len(keys) // 2
    (model / "model-00001-of-00002.safetensors").write_bytes(safetensors_bytes({k: base.tensors[k] for k in keys[:half]}))
    index = {"metadata": {}, "weight_map": {k: "model-0000%d-of-00002.safetensors" % (1 if i < half else 2) for i, k in enumerate(keys)}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return [str(model), "--recipe", "identity"]


@case("hf-index-not-json", "hf", "a shard index that is not JSON", r"index|JSON", names="model.safetensors.index.json")
def _(d, base):
    model = hf_copy(d, base)
    (model / "model.safetensors.index.json").write_text("{weight_map")
    return [str(model), "--recipe", "identity"]


@case("hf-index-escapes", "hf", "a shard index naming a file outside the directory", r"outside|index", names="model.safetensors.index.json")
def _(d, base):
    model = hf_copy(d, base)
    (d / "elsewhere.safetensors").write_bytes(safetensors_bytes(base.tensors))
    index = {"weight_map": {k: "../elsewhere.safetensors" for k in base.tensors}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return [str(model), "--recipe", "identity"]


@case("hf-no-weights", "hf", "config.json but no weights", r"no \*\.safetensors", names="model")
def _(d, base):
    model = hf_copy(d, base, weights=False)
    return [str(model), "--recipe", "identity"]


@case("hf-pickled-bin", "hf", "only a pickled pytorch_model.bin", r"pickled|safetensors", names="pytorch_model.bin", marker="ran")
def _(d, base):
    model = hf_copy(d, base, weights=False)
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(MarkerPayload(str(d / "ran"))))
    return [str(model), "--recipe", "identity"]


@case("hf-file-in-dir", "hf", "a file inside the checkpoint instead of the dir", r"give the checkpoint directory", names="model.safetensors")
def _(d, base):
    model = hf_copy(d, base)
    return [str(model / "model.safetensors"), "--recipe", "identity"]


# ---------------------------------------------------------------- GGUF


def gguf_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_bytes(*, arch: str = "llama", version: int = 3, tensor_type: int = 0, kv_extra: bytes = b"", n_kv_extra: int = 0,
               cut: int | None = None, tensor_count: int | None = None) -> bytes:
    """A small GGUF file by hand: the architecture key and one 4x8 tensor of `tensor_type`."""
    kv = gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string(arch) + kv_extra
    info = gguf_string("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 8, 4) + struct.pack("<I", tensor_type) + struct.pack("<Q", 0)
    count = 1 if tensor_count is None else tensor_count
    head = b"GGUF" + struct.pack("<I", version) + struct.pack("<QQ", count, 1 + n_kv_extra) + kv + info
    head += b"\x00" * (-len(head) % 32)
    data = np.arange(32, dtype=np.float32).tobytes()
    out = head + data
    return out if cut is None else out[:cut]


def gguf_case(d: Path, data: bytes) -> list[str]:
    (d / "model.gguf").write_bytes(data)
    return [str(d / "model.gguf"), "--recipe", "identity"]


@case("gguf-bad-magic", "gguf", "bad magic bytes", r"not a GGUF", names="model.gguf")
def _(d, base):
    return gguf_case(d, b"GGML" + gguf_bytes()[4:])


@case("gguf-empty", "gguf", "an empty file", r"not a GGUF|truncated", names="model.gguf")
def _(d, base):
    return gguf_case(d, b"")


@case("gguf-version", "gguf", "an unknown GGUF version", r"version", names="model.gguf")
def _(d, base):
    return gguf_case(d, gguf_bytes(version=99))


@case("gguf-truncated-data", "gguf", "tensor data cut off", r"truncated", names="model.gguf")
def _(d, base):
    full = gguf_bytes()
    return gguf_case(d, full[:-40])


@case("gguf-truncated-header", "gguf", "header cut in the middle of the metadata", r"truncated", names="model.gguf")
def _(d, base):
    return gguf_case(d, gguf_bytes()[:30])


@case("gguf-unknown-quant", "gguf", "a tensor of an unknown quantization type", r"type", names="model.gguf")
def _(d, base):
    return gguf_case(d, gguf_bytes(tensor_type=250))


@case("gguf-absurd-string", "gguf", "a metadata string of 2^60 bytes", r"truncated|length", names="model.gguf")
def _(d, base):
    kv = gguf_string("general.name") + struct.pack("<I", 8) + struct.pack("<Q", 2**60) + b"x" * 16
    return gguf_case(d, gguf_bytes(kv_extra=kv, n_kv_extra=1))


@case("gguf-absurd-array", "gguf", "a metadata array of 2^62 elements", r"truncated|length", names="model.gguf")
def _(d, base):
    kv = gguf_string("tokenizer.ggml.tokens") + struct.pack("<I", 9) + struct.pack("<I", 8) + struct.pack("<Q", 2**62)
    return gguf_case(d, gguf_bytes(kv_extra=kv, n_kv_extra=1))


@case("gguf-absurd-counts", "gguf", "a tensor count of 2^63", r"truncated|count", names="model.gguf")
def _(d, base):
    return gguf_case(d, gguf_bytes(tensor_count=2**63))


@case("gguf-unknown-value-type", "gguf", "a metadata value of an unknown type", r"type", names="model.gguf")
def _(d, base):
    kv = gguf_string("general.name") + struct.pack("<I", 77) + b"\x00" * 8
    return gguf_case(d, gguf_bytes(kv_extra=kv, n_kv_extra=1))


@case("gguf-unsupported-arch", "gguf", "an architecture transformers cannot read", r"architecture", names="model.gguf")
def _(d, base):
    return gguf_case(d, gguf_bytes(arch="rwkv-evil"))


@case("gguf-llama-without-metadata", "gguf", "a well-formed llama GGUF without its hyper-parameters or tokenizer", r"cannot load the GGUF|metadata|GGUF",
      names="model.gguf")
def _(d, base):
    return gguf_case(d, gguf_bytes())


@case("gguf-absurd-block-count", "gguf", "metadata claiming a million blocks (a memory bomb if believed)", r"blocks", names="model.gguf")
def _(d, base):
    kv = (gguf_string("llama.block_count") + struct.pack("<I", 4) + struct.pack("<I", 10**6)
          + gguf_string("llama.embedding_length") + struct.pack("<I", 4) + struct.pack("<I", 8))
    return gguf_case(d, gguf_bytes(kv_extra=kv, n_kv_extra=2))


# ---------------------------------------------------------------- ONNX


def onnx_model(external: bool = False):
    """A small valid ONNX model: y = relu(x @ W + b), W 16x16 (1 KB, so it can live in external data)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32), "W")
    b = numpy_helper.from_array(np.zeros(16, np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [w, b])
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def onnx_case(d: Path, model, name: str = "model.onnx") -> list[str]:
    import onnx

    onnx.save(model, str(d / name))
    return [str(d / name), "--recipe", "identity"]


def external_case(d: Path, location: str) -> list[str]:
    """An ONNX model whose W lives in external data at `location` (written as given, unchecked)."""
    import onnx

    m = onnx_model()
    w = m.graph.initializer[0]
    w.data_location = onnx.TensorProto.EXTERNAL
    w.ClearField("raw_data")
    del w.external_data[:]
    for k, v in (("location", location), ("offset", "0"), ("length", str(16 * 16 * 4))):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    (d / "model").mkdir(exist_ok=True)
    with open(d / "model" / "model.onnx", "wb") as f:
        f.write(m.SerializeToString())
    return [str(d / "model" / "model.onnx"), "--recipe", "identity"]


@case("onnx-random-bytes", "onnx", "random bytes, not protobuf", r"not a readable ONNX", names="model.onnx")
def _(d, base):
    (d / "model.onnx").write_bytes(np.random.default_rng(1).bytes(4096))
    return [str(d / "model.onnx"), "--recipe", "identity"]


@case("onnx-empty", "onnx", "an empty file", r"not (a readable )?an? ONNX|no nodes|empty", names="model.onnx")
def _(d, base):
    (d / "model.onnx").write_bytes(b"")
    return [str(d / "model.onnx"), "--recipe", "identity"]


@case("onnx-cycle", "onnx", "a graph with a cycle", r"cycle|order", names="model.onnx")
def _(d, base):
    from onnx import helper

    m = onnx_model()
    m.graph.node[0].input[0] = "y"  # mm reads relu's output: mm -> add -> relu -> mm
    m.graph.node.append(helper.make_node("Identity", ["x"], ["unused"], name="id"))
    return onnx_case(d, m)


@case("onnx-unknown-domain", "onnx", "a node of an unknown op domain", r"domain", names="model.onnx")
def _(d, base):
    from onnx import helper

    m = onnx_model()
    m.graph.node[2].domain = "com.evil"
    m.opset_import.append(helper.make_opsetid("com.evil", 1))
    return onnx_case(d, m)


@case("onnx-missing-initializer", "onnx", "a node input that nothing produces", r"not produced|missing", names="model.onnx")
def _(d, base):
    m = onnx_model()
    del m.graph.initializer[1]  # b
    return onnx_case(d, m)


@case("onnx-old-opset", "onnx", "opset 7", r"opset", names="model.onnx")
def _(d, base):
    m = onnx_model()
    m.opset_import[0].version = 7
    return onnx_case(d, m)


@case("onnx-no-nodes", "onnx", "a model with an empty graph", r"no nodes|not an ONNX", names="model.onnx")
def _(d, base):
    m = onnx_model()
    del m.graph.node[:]
    return onnx_case(d, m)


@case("onnx-ext-parent", "onnx", "external data at ../../etc/passwd", r"outside|escapes", names="model.onnx")
def _(d, base):
    return external_case(d, "../../etc/passwd")


@case("onnx-ext-absolute", "onnx", "external data at an absolute path", r"absolute|outside", names="model.onnx")
def _(d, base):
    return external_case(d, "/etc/passwd")


@case("onnx-ext-symlink", "onnx", "external data through a symlink that leaves the directory", r"outside|symlink", names="model.onnx")
def _(d, base):
    args = external_case(d, "weights.bin")
    (d / "secret.bin").write_bytes(b"\x00" * 2048)
    (d / "model" / "weights.bin").symlink_to(d / "secret.bin")
    return args


@case("onnx-ext-missing", "onnx", "external data file that does not exist", r"does not exist|missing", names="model.onnx")
def _(d, base):
    return external_case(d, "weights.bin")


@case("onnx-ext-short", "onnx", "external data file shorter than the offsets", r"truncated|past the end|shorter", names="model.onnx")
def _(d, base):
    args = external_case(d, "weights.bin")
    (d / "model" / "weights.bin").write_bytes(b"\x00" * 100)
    return args


@case("onnx-over-2gb", "onnx", "a 2.1 GB .onnx file without external data (sparse file)", r"2 GB|external data", names="model.onnx")
def _(d, base):
    with open(d / "model.onnx", "wb") as f:
        f.write(b"\x08\x07")
        f.truncate(2**31 + 1024)
    return [str(d / "model.onnx"), "--recipe", "identity"]


# ---------------------------------------------------------------- PyTorch


@case("pt-pickle-payload", "pytorch", "a torch.save file whose pickle would run code", r"--trust-pickle", names="model.pt", marker="ran")
def _(d, base):
    torch.save({"w": MarkerPayload(str(d / "ran"))}, d / "model.pt")
    return [str(d / "model.pt"), "--recipe", "identity"]


@case("pt-raw-pickle-payload", "pytorch", "a bare pickle (not a zip) that would run code", r"--trust-pickle|cannot read", names="model.pt", marker="ran")
def _(d, base):
    (d / "model.pt").write_bytes(pickle.dumps(MarkerPayload(str(d / "ran")), protocol=2))
    return [str(d / "model.pt"), "--recipe", "identity"]


@case("pt-foreign-zip", "pytorch", "a zip that is not a torch checkpoint", r"not a readable torch\.save", names="model.pt")
def _(d, base):
    with zipfile.ZipFile(d / "model.pt", "w") as z:
        z.writestr("hello.txt", "not a checkpoint")
    return [str(d / "model.pt"), "--recipe", "identity"]


@case("pt-truncated-zip", "pytorch", "a torch.save zip cut in half", r"cannot read|truncated", names="model.pt")
def _(d, base):
    torch.save(base.tensors, d / "full.pt")
    data = (d / "full.pt").read_bytes()
    (d / "full.pt").unlink()
    (d / "model.pt").write_bytes(data[: len(data) // 2])
    return [str(d / "model.pt"), "--recipe", "identity", "--config", str(base.hf)]


@case("pt-empty", "pytorch", "an empty .pt file", r"not a PyTorch checkpoint", names="model.pt")
def _(d, base):
    (d / "model.pt").write_bytes(b"")
    return [str(d / "model.pt"), "--recipe", "identity"]


@case("pt-list", "pytorch", "a list of tensors instead of a state dict", r"state dict", names="model.pt")
def _(d, base):
    torch.save([torch.zeros(2)], d / "model.pt")
    return [str(d / "model.pt"), "--recipe", "identity"]


@case("pt-state-without-config", "pytorch", "a state dict without --config", r"--config", names="model.pt")
def _(d, base):
    torch.save(base.tensors, d / "model.pt")
    return [str(d / "model.pt"), "--recipe", "identity"]


@case("pt-state-missing-key", "pytorch", "a state dict missing a tensor of --config's model", r"missing", names="model.pt")
def _(d, base):
    t = dict(base.tensors)
    t.pop(first_weight(base))
    torch.save(t, d / "model.pt")
    return [str(d / "model.pt"), "--recipe", "identity", "--config", str(base.hf)]


@case("pt-state-extra-key", "pytorch", "a state dict with a tensor --config's model lacks", r"unexpected", names="model.pt")
def _(d, base):
    torch.save({**base.tensors, "evil.weight": torch.zeros(1)}, d / "model.pt")
    return [str(d / "model.pt"), "--recipe", "identity", "--config", str(base.hf)]


@case("pt-state-wrong-shape", "pytorch", "a state dict whose shapes differ from --config's", r"do not fit|size mismatch|shape", names="model.pt")
def _(d, base):
    t = dict(base.tensors)
    k = first_weight(base)
    t[k] = torch.zeros(3, 3)
    torch.save(t, d / "model.pt")
    return [str(d / "model.pt"), "--recipe", "identity", "--config", str(base.hf)]


@case("pt-config-missing", "pytorch", "--config naming a directory without config.json", r"--config", names="--config")
def _(d, base):
    torch.save(base.tensors, d / "model.pt")
    (d / "nocfg").mkdir()
    return [str(d / "model.pt"), "--recipe", "identity", "--config", str(d / "nocfg")]


@case("pt2-random-bytes", "pytorch", "a .pt2 of random bytes", r"not a readable torch\.export", names="model.pt2")
def _(d, base):
    (d / "model.pt2").write_bytes(np.random.default_rng(2).bytes(2048))
    return [str(d / "model.pt2"), "--recipe", "identity"]


@case("pt2-state-dict-zip", "pytorch", "a torch.save state dict renamed to .pt2", r"not a readable torch\.export", names="model.pt2")
def _(d, base):
    torch.save(base.tensors, d / "model.pt2")
    return [str(d / "model.pt2"), "--recipe", "identity"]


# ---------------------------------------------------------------- recipes


def recipe_case(d: Path, base: Base, text: str | bytes, extra: tuple[str, ...] = ()) -> list[str]:
    p = d / "bad.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return [str(base.hf), "--recipe", str(p), *extra]


@case("recipe-unknown-top-key", "recipe", "an unknown top-level key", r"unknown key", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, "name: x\npasses: [identity]\nbogus: 1\n")


@case("recipe-unknown-pass", "recipe", "a pass that does not exist", r"unknown pass", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, "name: x\npasses:\n  - no_such_pass: {}\n")


@case("recipe-unknown-option", "recipe", "an unknown option of a pass", r"unknown key 'flap\.sparsityy'", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, "name: x\npasses:\n  - flap: {sparsityy: 0.2}\n")


@case("recipe-wrong-type", "recipe", "a ratio given as text", r"flap\.sparsity", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, "name: x\npasses:\n  - flap: {sparsity: half}\n")


@case("recipe-out-of-range", "recipe", "a ratio above 1", r"flap\.sparsity", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, "name: x\npasses:\n  - flap: {sparsity: 1.5}\n")


@case("recipe-negative", "recipe", "a negative sample count", r"flap\.samples", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, "name: x\npasses:\n  - flap: {samples: -3}\n")


@case("recipe-order", "recipe", "sparsity before structure (an order the pipeline forbids)", r"order|before|after", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, "name: x\npasses:\n  - nm: {}\n  - flap: {sparsity: 0.2}\n")


@case("recipe-yaml-bomb", "recipe", "a billion-laughs YAML bomb (10^9 strings behind 10 aliases)", r"alias|anchor", names="bad.yaml")
def _(d, base):
    levels = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"&a{i} [{', '.join(['*a%d' % (i - 1)] * 10)}]" for i in range(1, 10)]
    return recipe_case(d, base, f"name: bomb\ndescription: [{', '.join(levels)}]\npasses: [identity]\n")


@case("recipe-not-yaml", "recipe", "invalid YAML", r"not valid YAML", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, "name: [x\npasses: {\n")


@case("recipe-binary", "recipe", "binary bytes", r"not valid YAML|UTF-8|text", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, bytes(range(256)))


@case("recipe-list", "recipe", "a YAML list instead of a mapping", r"expected a mapping", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, "- flap\n- nm\n")


@case("recipe-empty", "recipe", "an empty file", r"expected a mapping|empty", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, "")


@case("recipe-passes-not-list", "recipe", "passes: 3", r"passes", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, "name: x\npasses: 3\n")


@case("recipe-options-not-mapping", "recipe", "a pass's options given as a list", r"options|mapping", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, "name: x\npasses:\n  - flap: [1, 2]\n")


@case("recipe-bad-version", "recipe", "version: abc", r"version", names="bad.yaml")
def _(d, base):
    return recipe_case(d, base, "name: x\nversion: abc\npasses: [identity]\n")


@case("recipe-unknown-name", "recipe", "a recipe name that is not shipped", r"unknown recipe", names="no-such-recipe")
def _(d, base):
    return [str(base.hf), "--recipe", "no-such-recipe"]


@case("recipe-set-malformed", "recipe", "--set without pass.key=value", r"--set", names="--set")
def _(d, base):
    return [str(base.hf), "--recipe", "flap-20", "--set", "sparsity"]


@case("recipe-set-unknown-pass", "recipe", "--set for a pass the recipe lacks", r"--set", names="--set")
def _(d, base):
    return [str(base.hf), "--recipe", "flap-20", "--set", "nm.n=2"]


@case("recipe-set-out-of-range", "recipe", "--set giving an out-of-range value", r"flap\.sparsity", names="flap-20")
def _(d, base):
    return [str(base.hf), "--recipe", "flap-20", "--set", "flap.sparsity=7"]


# ---------------------------------------------------------------- calibration files


def calib_case(d: Path, base: Base, name: str, data: bytes) -> list[str]:
    (d / name).write_bytes(data)
    return [str(base.hf), *TINY_FLAP, "--calib", str(d / name)]


@case("calib-empty-txt", "calibration", "an empty text file", r"empty", names="calib.txt")
def _(d, base):
    return calib_case(d, base, "calib.txt", b"")


@case("calib-binary-txt", "calibration", "binary bytes as text", r"UTF-8|text", names="calib.txt")
def _(d, base):
    return calib_case(d, base, "calib.txt", np.random.default_rng(3).bytes(4096))


@case("calib-latin1-txt", "calibration", "text in Latin-1, not UTF-8", r"UTF-8", names="calib.txt")
def _(d, base):
    return calib_case(d, base, "calib.txt", ("caf\xe9 na\xefve " * 200).encode("latin-1"))


@case("calib-short-txt", "calibration", "fewer tokens than one window", r"fewer than seq_len", names="calib.txt")
def _(d, base):
    return calib_case(d, base, "calib.txt", b"w1")


@case("calib-empty-jsonl", "calibration", "a JSONL file with no lines", r"no JSON lines", names="calib.jsonl")
def _(d, base):
    return calib_case(d, base, "calib.jsonl", b"\n\n")


@case("calib-broken-jsonl", "calibration", "a JSONL line that is not JSON", r"not valid JSON", names="calib.jsonl")
def _(d, base):
    return calib_case(d, base, "calib.jsonl", b'{"text": "w1 w2"}\n{"text": \n')


@case("calib-jsonl-no-text", "calibration", "JSONL objects without 'text'", r"'text'", names="calib.jsonl")
def _(d, base):
    return calib_case(d, base, "calib.jsonl", b'{"body": "w1 w2"}\n')


@case("calib-jsonl-bad-ids", "calibration", "JSONL input_ids that are strings", r"input_ids", names="calib.jsonl")
def _(d, base):
    return calib_case(d, base, "calib.jsonl", b'{"input_ids": ["a", "b"]}\n')


@case("calib-ids-beyond-vocab", "calibration", "token ids beyond the vocabulary", r"outside the model's vocabulary", names="ids.pt")
def _(d, base):
    torch.save(torch.full((4, 64), 10**6, dtype=torch.long), d / "ids.pt")
    return [str(base.hf), *TINY_FLAP, "--calib", str(d / "ids.pt")]


@case("calib-ids-negative", "calibration", "negative token ids", r">= 0", names="ids.npy")
def _(d, base):
    np.save(d / "ids.npy", -np.ones((4, 64), dtype=np.int64))
    return [str(base.hf), *TINY_FLAP, "--calib", str(d / "ids.npy")]


@case("calib-ids-float", "calibration", "token ids stored as floats", r"integers", names="ids.npy")
def _(d, base):
    np.save(d / "ids.npy", np.ones((4, 64), dtype=np.float32))
    return [str(base.hf), *TINY_FLAP, "--calib", str(d / "ids.npy")]


@case("calib-npy-pickle", "calibration", "an .npy object array (a pickle)", r"\.npy|pickle", names="ids.npy", marker="ran")
def _(d, base):
    np.save(d / "ids.npy", np.array([MarkerPayload(str(d / "ran"))], dtype=object), allow_pickle=True)
    return [str(base.hf), *TINY_FLAP, "--calib", str(d / "ids.npy")]


@case("calib-pt-pickle", "calibration", "token ids in a .pt whose pickle would run code", r"not a tensor of token ids|pickle", names="ids.pt", marker="ran")
def _(d, base):
    torch.save(MarkerPayload(str(d / "ran")), d / "ids.pt")
    return [str(base.hf), *TINY_FLAP, "--calib", str(d / "ids.pt")]


@case("calib-missing", "calibration", "a calibration file that does not exist", r"does not exist", names="nothere.txt")
def _(d, base):
    return [str(base.hf), *TINY_FLAP, "--calib", str(d / "nothere.txt")]


@case("calib-unknown-kind", "calibration", "a calibration file of an unknown kind", r"calibration source", names="calib.csv")
def _(d, base):
    (d / "calib.csv").write_text("a,b\n")
    return [str(base.hf), *TINY_FLAP, "--calib", str(d / "calib.csv")]


# ---------------------------------------------------------------- command line


@case("cli-missing-input", "cli", "an input path that does not exist", r"no such file", names="nothere")
def _(d, base):
    return [str(d / "nothere"), "--recipe", "identity"]


@case("cli-unknown-format", "cli", "an unknown output format", r"unknown output format", names="safetensorz")
def _(d, base):
    return [str(base.hf), "--recipe", "identity", "--format", "safetensorz"]


@case("cli-unknown-extension", "cli", "an input of an unknown file type", r"unknown model format", names="model.h5")
def _(d, base):
    (d / "model.h5").write_bytes(b"\x89HDF")
    return [str(d / "model.h5"), "--recipe", "identity"]


@case("cli-bad-dtype", "cli", "an unknown --dtype", r"dtype", names="float8")
def _(d, base):
    return [str(base.hf), "--recipe", "identity", "--dtype", "float8"]


@case("cli-bad-device", "cli", "an unknown --device", r"device", names="tpu")
def _(d, base):
    return [str(base.hf), "--recipe", "identity", "--device", "tpu"]


@case("cli-tokenizer-dir-empty", "cli", "--tokenizer naming a directory without a tokenizer", r"no tokenizer", names="--tokenizer")
def _(d, base):
    (d / "tok").mkdir()
    return [str(base.hf), "--recipe", "identity", "--tokenizer", str(d / "tok")]


# ---------------------------------------------------------------- training data (passes that train: hesso)

TRAIN = ["--recipe", "hesso-50", "--set", "hesso.periods=1"]


@case("train-no-length", "training", "a training recipe without --epochs or --steps", r"trains the model.*--epochs", names="hesso")
def _(d, base):
    return [str(base.hf), *TRAIN, "--data", "pydoc"]


@case("train-unknown-data", "training", "--data naming no built-in source or file type", r"unknown training data", names="imagenet")
def _(d, base):
    return [str(base.hf), *TRAIN, "--data", "imagenet", "--epochs", "1"]


@case("train-missing-text", "training", "--data naming a text file that does not exist", r"does not exist", names="corpus.txt")
def _(d, base):
    return [str(base.hf), *TRAIN, "--data", str(d / "corpus.txt"), "--epochs", "1"]


@case("train-images-for-lm", "training", "image-classification data for a language model", r"language model", names="digits")
def _(d, base):
    return [str(base.hf), *TRAIN, "--data", "digits", "--epochs", "1"]


@case("train-npz-for-lm", "training", "a .npz of inputs and labels for a language model", r"language model", names="data.npz")
def _(d, base):
    np.savez(d / "data.npz", inputs=np.zeros((4, 3), np.float32), labels=np.zeros(4, np.int64))
    return [str(base.hf), *TRAIN, "--data", str(d / "data.npz"), "--epochs", "1"]
