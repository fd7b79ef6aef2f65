"""The slimc N:M compressed weight format ("slimc-nm"): pack, unpack, validate.

A weight W [out, in] is N:M sparse along the input axis when every group of M consecutive inputs
of a row, columns [g*M, (g+1)*M), holds at most N non-zeros. It is stored as two tensors:

    values [out, in*N/M]  (W's dtype)  row r, group g: the N kept values of the group, in
                          increasing column order, at values[r, g*N : (g+1)*N]. A group with
                          fewer than N non-zeros keeps some zeros (padding) so every group has N.
    meta   [out, in*N/M*B/8] uint8     the position (0..M-1) inside its group of each kept value,
                          B bits per position, B = 2 for M <= 4, 4 for M <= 16, 8 for M <= 256
                          (a power of two, so a position never straddles a byte).
                          Kept value k of a row has its position in byte k*B//8 at bits
                          [(k*B)%8, (k*B)%8 + B) — little-endian: the first value in the low bits.

For 2:4 (B = 2) one byte holds the 4 positions of two groups (8 input columns); a little-endian
uint32 word holds 16 positions: exactly the 16 kept values (32 bytes of fp16) that cover 32 input
columns. A CUDA thread that loads 32 bytes of values reads one aligned 4-byte metadata word, and
consecutive threads read consecutive words, so both streams are coalesced (see
cuda/sparse24_decode.cu). Requires in % M == 0 and (in*N/M*B) % 8 == 0 (for 2:4: in % 8 == 0).

Round trip: `unpack(*pack(W, n, m), n, m, in)` equals W exactly for N:M-sparse W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimc.errors import SlimcError

FORMAT_NAME = "slimc-nm"


def index_bits(m: int) -> int:
    """Bits per stored position: the smallest of 2, 4, 8 that holds 0..m-1."""
    if m <= 4:
        return 2
    if m <= 16:
        return 4
    if m <= 256:
        return 8
    raise SlimcError(f"N:M with M={m} is not supported (M must be at most 256)")


def check_nm(n: int, m: int, in_features: int | None = None) -> None:
    """Raise SlimcError unless 1 <= n < m <= 256 (and `in_features` fits the packed layout)."""
    if not (1 <= n < m <= 256):
        raise SlimcError(f"N:M needs 1 <= N < M <= 256, got {n}:{m}")
    if in_features is not None:
        bits = index_bits(m)
        if in_features % m or (in_features // m * n * bits) % 8:
            raise SlimcError(
                f"a layer with {in_features} inputs cannot hold {n}:{m} groups in the packed format "
                f"(needs inputs divisible by {m} and whole metadata bytes); skip this layer or use format: dense"
            )


@dataclass(frozen=True)
class PackedNM:
    values: torch.Tensor  # [out, in*N/M]
    meta: torch.Tensor  # [out, in*N/M*B/8] uint8
    n: int
    m: int
    in_features: int


def group_counts(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros per group of `m` consecutive inputs: [out, in/m]."""
    out, inp = weight.shape
    return (weight != 0).reshape(out, inp // m, m).sum(-1)


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of `m` consecutive inputs of every row has at most `n` non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % m:
        return False
    return bool((group_counts(weight, m) <= n).all())


def pack_positions(pos: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, L] positions (each < 2**bits) -> [rows, L*bits/8] uint8, little-endian within a byte."""
    rows, length = pos.shape
    per = 8 // bits
    p = pos.to(torch.int32).reshape(rows, length // per, per)
    shifts = torch.arange(per, dtype=torch.int32, device=pos.device) * bits
    return (p << shifts).sum(-1).to(torch.uint8)


def unpack_positions(meta: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of `pack_positions`: [rows, L*bits/8] uint8 -> [rows, L] int64."""
    per = 8 // bits
    # floor division and remainder rather than shifts: the same integers, and they export to ONNX
    # (whose BitShift takes unsigned types only)
    scale = (2 ** (torch.arange(per, dtype=torch.int32, device=meta.device) * bits)).to(torch.int32)
    p = torch.div(meta.to(torch.int32).unsqueeze(-1), scale, rounding_mode="floor") % (1 << bits)
    return p.reshape(meta.shape[0], -1)[:, :length].to(torch.int64)


def pack(weight: torch.Tensor, n: int, m: int, mask: torch.Tensor | None = None) -> PackedNM:
    """Compress an N:M-sparse weight. `mask` (True = kept) defaults to `weight != 0`.

    Raises SlimcError if a group keeps more than N entries (run the `nm` pass first).
    """
    if weight.dim() != 2:
        raise SlimcError(f"N:M packing needs a 2-D weight, got shape {tuple(weight.shape)}")
    out, inp = weight.shape
    check_nm(n, m, inp)
    keep = (weight != 0) if mask is None else mask.to(torch.bool)
    groups = keep.reshape(out, inp // m, m)
    if bool((groups.sum(-1) > n).any()):
        raise SlimcError(f"weight is not {n}:{m} sparse (a group of {m} inputs keeps more than {n}); prune it with the nm pass first")
    # kept positions first, then the lowest free positions as zero padding; stable order per group
    order = torch.arange(m, device=weight.device)
    key = (~groups).to(torch.int64) * m + order
    pos = key.argsort(dim=-1)[..., :n].sort(dim=-1).values  # [out, G, n]
    vals = torch.gather(weight.reshape(out, inp // m, m), -1, pos)
    vals = torch.where(torch.gather(groups, -1, pos), vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
    bits = index_bits(m)
    meta = pack_positions(pos.reshape(out, -1), bits)
    return PackedNM(vals.reshape(out, -1).contiguous(), meta.contiguous(), n, m, inp)


def unpack(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    """Dense [out, in] weight from packed values + metadata (zeros elsewhere)."""
    out = values.shape[0]
    groups = in_features // m
    pos = unpack_positions(meta, index_bits(m), groups * n).reshape(out, groups, n)
    dense = torch.zeros(out, groups, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos.to(values.device), values.reshape(out, groups, n))
    return dense.reshape(out, in_features)


def packed_nbytes(out_features: int, in_features: int, n: int, m: int, element_size: int) -> int:
    """Bytes of values + metadata for one packed weight."""
    kept = out_features * in_features // m * n
    return kept * element_size + kept * index_bits(m) // 8
