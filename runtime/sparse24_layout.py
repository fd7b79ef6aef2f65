"""The 2:4 weight layout of the prefill kernel (`sparse24_prefill.cu`): conversion from and back to slimc-nm.

Pure torch (runs on CPU or GPU, no extension needed). The conversion runs once per weight, at load
time; the kernel then reads each lane's mma.sp operands with one 16-byte load (values) and one
4-byte load (metadata).

Kernel layout, for W [N, K] 2:4-sparse along K, N padded to a multiple of 128 (`ROW_PAD`) and K to
a multiple of 64 (`COL_PAD`) with zero weights:

    a_vals [N/16, K/32, 32, 8]  (W's dtype)  tile (mt, kt) = rows 16mt.., columns 32kt..; for lane
        l = 4g + t and element e: the compressed (kept-value) column 2t + (e & 1) + 8 (e >> 2) of tile
        row g + 8 ((e >> 1) & 1)  -- the sparse-A fragment order of mma.m16n8k32 (f16/bf16), the same
        as the dense m16n8k16 A fragment over the 16 kept values of each 32-column row slice.
    a_meta [N/16, K/32, 16]  int32 (bit pattern of uint32)  word 2g + t (t = 0, 1) is the metadata
        register of lane 4g + t for sparsity selector 0: bits [0, 16) hold tile row g, bits [16, 32)
        tile row g + 8, both for columns [16t, 16t + 16) of the tile; inside 16 bits, 4 bits per
        group of 4 columns, the two 2-bit positions low first (the slimc-nm order).

`to_mma_layout` builds it, `from_mma_layout` inverts it exactly, and `mma_layout_dense` decodes it
into the dense weight the way the tensor core is assumed to read it (fragment and metadata
semantics written out independently of the conversion), so a CPU test can check that the kernel's
operands describe the same W as `unpack(values, meta)`.

ASSUMPTION TO CHECK ON A GPU FIRST: which metadata half (row g vs row g+8, columns 0-15 vs 16-31)
belongs to which lane/bit range (`_META_*` below) is read from the PTX ISA's description of
mma.sp m16n8k32 metadata for 16-bit types, not yet confirmed by running the kernel. If the GPU test
fails with errors of order 1 while the dense reference is fine, this mapping is the first suspect;
it lives only here (the kernel reads words, it does not interpret them).
"""

from __future__ import annotations

import torch

from slimc.runtime.sparse_format import unpack

ROW_PAD = 128  # the kernel's block rows (BM)
COL_PAD = 64  # the kernel's K stage (BK)
PAD_META_BYTE = 0x44  # two groups of positions (0, 1): a valid ordered pattern for zero padding


def _fragment_index() -> tuple[torch.Tensor, torch.Tensor]:
    """(row, compressed column) inside a 16 x 16-compressed tile for each (lane, element): [32, 8] each."""
    lane = torch.arange(32).unsqueeze(1)
    e = torch.arange(8).unsqueeze(0)
    g, t = lane // 4, lane % 4
    row = g + 8 * ((e // 2) % 2)
    col = 2 * t + (e % 2) + 8 * (e // 4)
    return row, col


def padded_shape(n: int, k: int) -> tuple[int, int]:
    return -(-n // ROW_PAD) * ROW_PAD, -(-k // COL_PAD) * COL_PAD


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def to_mma_layout(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slimc-nm (values [N, K/2], meta [N, K/8] uint8) -> the kernel's (a_vals, a_meta), on the same device."""
    n = values.shape[0]
    k = in_features
    if k % 8 or values.shape[1] * 2 != k or meta.shape != (n, k // 8):
        raise ValueError(f"to_mma_layout: values {tuple(values.shape)} / meta {tuple(meta.shape)} do not fit K={k}")
    n_pad, k_pad = padded_shape(n, k)
    v = values.new_zeros(n_pad, k_pad // 2)
    v[:n, : k // 2] = values
    m = torch.full((n_pad, k_pad // 8), PAD_META_BYTE, dtype=torch.uint8, device=meta.device)
    m[:n, : k // 8] = meta
    mt, kt = n_pad // 16, k_pad // 32
    # values: [mt, 16 rows, kt, 16 compressed cols] -> [mt, kt, lane, e]
    v4 = v.reshape(mt, 16, kt, 16).permute(0, 2, 1, 3)  # [mt, kt, 16, 16]
    row, col = _fragment_index()
    a_vals = v4[:, :, row.to(v.device), col.to(v.device)].contiguous()  # [mt, kt, 32, 8]
    # metadata: 16-bit words per (row, 16-column half): bytes 2h, 2h+1 of each 4-byte group
    b = m.to(torch.int64).reshape(n_pad, kt, 2, 2)
    half = b[..., 0] | (b[..., 1] << 8)  # [n_pad, kt, 2]: row, k32 tile, column half
    half = half.reshape(mt, 2, 8, kt, 2)  # [mt, row >= 8, g, kt, t]
    words = half[:, 0] | (half[:, 1] << 16)  # [mt, g, kt, t]
    a_meta = _to_int32(words.permute(0, 2, 1, 3).reshape(mt, kt, 16)).contiguous()
    return a_vals, a_meta


def from_mma_layout(a_vals: torch.Tensor, a_meta: torch.Tensor, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inverse of `to_mma_layout`: back to slimc-nm (values [N, K/2], meta [N, K/8] uint8)."""
    mt, kt = a_vals.shape[:2]
    n_pad, k_pad = mt * 16, kt * 32
    row, col = _fragment_index()
    v4 = a_vals.new_zeros(mt, kt, 16, 16)
    v4[:, :, row.to(a_vals.device), col.to(a_vals.device)] = a_vals
    v = v4.permute(0, 2, 1, 3).reshape(n_pad, k_pad // 2)
    words = a_meta.to(torch.int64) & 0xFFFFFFFF  # [mt, kt, 16]
    words = words.reshape(mt, kt, 8, 2).permute(0, 2, 1, 3)  # [mt, g, kt, t]
    half = torch.stack([words & 0xFFFF, words >> 16], dim=1)  # [mt, row >= 8, g, kt, t]
    half = half.reshape(n_pad, kt, 2)
    b = torch.stack([half & 0xFF, half >> 8], dim=-1)  # [n_pad, kt, 2, 2]
    m = b.reshape(n_pad, k_pad // 8).to(torch.uint8)
    k = in_features
    return v[:out_features, : k // 2].contiguous(), m[:out_features, : k // 8].contiguous()


def mma_layout_dense(a_vals: torch.Tensor, a_meta: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The dense W [N, K] that the kernel's operands encode, decoded element by element as the mma reads them.

    Written from the operand semantics (fragment order; metadata lane/bit assignment), not by
    inverting `to_mma_layout`: for lane l = 4g + t and element e of tile (mt, kt), the value sits at
    tile row r = g + 8 ((e >> 1) & 1), compressed column c = 2t + (e & 1) + 8 (e >> 2), i.e. group
    q = c // 2 (4 dense columns) and slot c % 2 of the group; its position comes from the metadata
    register of lane 4 (r % 8) + q // 4, bits 16 (r // 8) + 4 (q % 4) + 2 (c % 2).
    """
    mt, kt = a_vals.shape[:2]
    dev = a_vals.device
    lane = torch.arange(32, device=dev).view(32, 1)
    e = torch.arange(8, device=dev).view(1, 8)
    g, t = lane // 4, lane % 4
    r = g + 8 * ((e >> 1) & 1)  # [32, 8]
    c = 2 * t + (e & 1) + 8 * (e >> 2)
    q = c // 2
    holder = 2 * (r % 8) + q // 4  # index into the 16 stored words (lane 4g + t' stored at 2g + t')
    shift = 16 * (r // 8) + 4 * (q % 4) + 2 * (c % 2)
    words = a_meta.to(torch.int64) & 0xFFFFFFFF  # [mt, kt, 16]
    w = words[:, :, holder]  # [mt, kt, 32, 8]
    pos = (w >> shift) & 3
    dense_col = 4 * q + pos  # column inside the 32-column tile
    dense = torch.zeros(mt, kt, 16, 32, dtype=a_vals.dtype, device=dev)
    mi = torch.arange(mt, device=dev).view(mt, 1, 1, 1).expand(mt, kt, 32, 8)
    ki = torch.arange(kt, device=dev).view(1, kt, 1, 1).expand(mt, kt, 32, 8)
    ri = r.view(1, 1, 32, 8).expand(mt, kt, 32, 8)
    # a kept zero and a padded slot may share a position with nothing else: 2:4 positions in a
    # group are distinct (ordered metadata), so plain assignment loses nothing
    dense[mi, ki, ri, dense_col] = a_vals
    full = dense.permute(0, 2, 1, 3).reshape(mt * 16, kt * 32)
    return full[:out_features, :in_features]


def reference_dense(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """The slimc-nm dense weight (for comparisons with `mma_layout_dense`)."""
    return unpack(values, meta, 2, 4, in_features)
