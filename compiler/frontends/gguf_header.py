"""A bounded reader of GGUF headers: everything a file promises is checked before anything trusts it.

    info = check_gguf(Path("model.gguf"))   # {"version", "architecture", "tensors": [...], "data_start"}

transformers (through the `gguf` package) memory-maps a GGUF file and believes its counts and
lengths; a hostile or damaged file then makes it allocate absurd buffers or index past the end.
This reader walks the header with every length checked against the bytes that remain, refuses
unknown value and tensor types, and checks that every tensor's data lies inside the file. Each
problem is one `SlimcError` naming the file.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from slimc.errors import SlimcError

GGUF_VERSIONS = (2, 3)
# value type -> struct format of a scalar (8: string, 9: array are read apart)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 8


class _Reader:
    def __init__(self, f: BinaryIO, size: int, path: Path):
        self.f, self.size, self.path = f, size, path

    def fail(self, what: str) -> SlimcError:
        return SlimcError(f"{self.path}: {what}; the GGUF file is truncated or corrupt, re-download or re-convert it")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.f.tell() + n > self.size:
            raise self.fail(f"{what} needs {n} bytes at offset {self.f.tell()} but the file has {self.size} (truncated, or a length field is absurd)")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        return struct.unpack(fmt, self.f.read(n))[0]

    def string(self, what: str) -> bytes:
        n = self.unpack("<Q", f"{what} length")
        self.need(n, what)
        return self.f.read(n)

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.f.seek(n, 1)

    def value(self, vtype: int, key: str) -> Any:
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype], f"metadata '{key}'")
        if vtype == STRING:
            return self.string(f"metadata '{key}'")
        if vtype == ARRAY:
            etype = self.unpack("<I", f"metadata '{key}' element type")
            count = self.unpack("<Q", f"metadata '{key}' element count")
            if etype in SCALARS:  # skipped without reading: only their total size must fit
                self.skip(count * struct.calcsize(SCALARS[etype]), f"metadata array '{key}' of {count} elements")
                return None
            if etype == STRING:
                # each string holds at least its 8-byte length: an absurd count is caught before the loop
                self.need(count * 8, f"metadata array '{key}' of {count} strings")
                for _ in range(count):
                    self.string(f"an element of metadata array '{key}'")
                return None
            raise self.fail(f"metadata array '{key}' has elements of unknown type {etype}")
        raise self.fail(f"metadata '{key}' has an unknown value type {vtype}")


def check_gguf(path: Path) -> dict[str, Any]:
    """The GGUF header of `path`, checked (see module docstring)."""
    import gguf

    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, size, path)
        if f.read(4) != b"GGUF":
            raise SlimcError(f"{path}: not a GGUF file (bad magic bytes); give a .gguf written by llama.cpp's converters")
        f.seek(4)
        version = r.unpack("<I", "the version")
        if version not in GGUF_VERSIONS:
            raise SlimcError(f"{path}: GGUF version {version} is not one slimc reads ({', '.join(map(str, GGUF_VERSIONS))}); "
                             "re-convert it with a current llama.cpp")
        n_tensors = r.unpack("<Q", "the tensor count")
        n_kv = r.unpack("<Q", "the metadata count")
        # every metadata entry and tensor record takes at least 12 bytes: absurd counts stop here
        r.need((n_tensors + n_kv) * 12, f"{n_kv} metadata entries and {n_tensors} tensor records")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string("a metadata key").decode("utf-8", "replace")
            vtype = r.unpack("<I", f"metadata '{key}' type")
            meta[key] = r.value(vtype, key)
        tensors = []
        for _ in range(n_tensors):
            name = r.string("a tensor name").decode("utf-8", "replace")
            n_dims = r.unpack("<I", f"tensor '{name}' rank")
            if n_dims > MAX_DIMS:
                raise r.fail(f"tensor '{name}' claims {n_dims} dimensions")
            dims = [r.unpack("<Q", f"tensor '{name}' shape") for _ in range(n_dims)]
            ttype = r.unpack("<I", f"tensor '{name}' type")
            offset = r.unpack("<Q", f"tensor '{name}' offset")
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise SlimcError(f"{path}: tensor '{name}' has quantization type {ttype}, which the gguf package does not know; "
                                 "re-convert the model with a supported type (e.g. Q8_0, Q4_K, F16)") from None
            count = 1
            for d in dims:
                count *= d
            tensors.append({"name": name, "shape": dims, "type": qtype.name, "offset": offset,
                            "nbytes": -(-count // block) * type_size})
        align = meta.get("general.alignment") or 32
        data_start = -(-f.tell() // align) * align
    for t in tensors:
        end = data_start + t["offset"] + t["nbytes"]
        if end > size:
            raise SlimcError(f"{path}: truncated GGUF file: tensor '{t['name']}' ends at byte {end}, the file has {size}; "
                             "re-download or re-convert it")
    arch = meta.get("general.architecture")
    arch = arch.decode("utf-8", "replace") if isinstance(arch, bytes) else None
    return {"version": version, "architecture": arch, "tensors": tensors, "data_start": data_start, "metadata": meta}


def check_gguf_shape(path: Path, header: dict[str, Any]) -> None:
    """Refuse hyper-parameters the tensors do not bear out, before a model is built from them.

    transformers builds the module from the metadata (falling back to a 7B default config for
    missing keys) before it reads a tensor: a missing or absurd `block_count` / `embedding_length`
    would allocate tens of GB. Both must be present and agree with the tensors in the file.
    """
    arch, meta = header["architecture"], header["metadata"]
    layers, width = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.embedding_length")
    if not isinstance(layers, int) or not isinstance(width, int) or layers < 1 or width < 1:
        raise SlimcError(f"{path}: the GGUF metadata lacks {arch}.block_count or {arch}.embedding_length, which slimc needs "
                         "to build the model; re-convert it with llama.cpp's convert_hf_to_gguf.py")
    names = {t["name"] for t in header["tensors"]}
    blocks = {int(n.split(".")[1]) for n in names if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if blocks != set(range(layers)):
        raise SlimcError(f"{path}: the GGUF metadata says {layers} blocks but the file holds tensors for {len(blocks)}; "
                         "the file is corrupt or hostile, re-download or re-convert it")
    widths = {t["shape"][0] for t in header["tensors"] if t["name"] in ("token_embd.weight", "output_norm.weight") and t["shape"]}
    if widths and widths != {width}:
        raise SlimcError(f"{path}: the GGUF metadata says embedding_length {width} but the tensors are {sorted(widths)} wide; "
                         "the file is corrupt or hostile, re-download or re-convert it")
