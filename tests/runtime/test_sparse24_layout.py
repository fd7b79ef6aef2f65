"""The prefill kernel's weight layout (runtime/sparse24_layout.py) on CPU: a bijection with slimc-nm.

For random 2:4 weights (fp16, bf16, fp32; shapes that need row and column padding and ones that do
not): `from_mma_layout(to_mma_layout(values, meta))` gives back (values, meta) bit for bit,
`mma_layout_dense` (the operands decoded as the tensor core is assumed to read them) equals
`unpack(values, meta)` exactly, every metadata nibble of the layout is a valid ordered mma.sp
pattern, and the reference op on the layout matches the slimc-nm reference op.
"""

from __future__ import annotations

import pytest
import torch

from slimc.runtime.sparse24_layout import from_mma_layout, mma_layout_dense, padded_shape, to_mma_layout
from slimc.runtime.sparse_format import pack, unpack

SHAPES = [(128, 64), (16, 32), (100, 40), (300, 200), (256, 1088), (1024, 512)]


def random_packed(n: int, k: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    # some groups keep fewer than 2 non-zeros (padding zeros in the packed values)
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    mask &= torch.rand(n, k // 4, 4, generator=gen) > 0.1
    p = pack((w * mask.reshape(n, k)).to(dtype), 2, 4)
    return p.values, p.meta


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_round_trip_and_decode(dtype, shape):
    n, k = shape
    values, meta = random_packed(n, k, dtype, n * 31 + k)
    a_vals, a_meta = to_mma_layout(values, meta, k)
    n_pad, k_pad = padded_shape(n, k)
    assert a_vals.shape == (n_pad // 16, k_pad // 32, 32, 8) and a_vals.dtype == dtype and a_vals.is_contiguous()
    assert a_meta.shape == (n_pad // 16, k_pad // 32, 16) and a_meta.dtype == torch.int32 and a_meta.is_contiguous()
    v2, m2 = from_mma_layout(a_vals, a_meta, n, k)
    assert torch.equal(v2, values) and torch.equal(m2, meta)
    assert torch.equal(mma_layout_dense(a_vals, a_meta, n, k), unpack(values, meta, 2, 4, k))
    # padding decodes to zeros
    assert not bool(mma_layout_dense(a_vals, a_meta, n_pad, k_pad)[n:].any())
    assert not bool(mma_layout_dense(a_vals, a_meta, n_pad, k_pad)[:, k:].any())


def test_every_value_slot_is_used_once():
    # the fragment map is a permutation of each tile's 16 x 16 kept values
    n, k = 128, 64
    values = torch.arange(n * k // 2, dtype=torch.float64).reshape(n, k // 2)
    meta = torch.full((n, k // 8), 0x44, dtype=torch.uint8)
    a_vals, _ = to_mma_layout(values, meta, k)
    assert torch.equal(a_vals.flatten().sort().values, values.flatten())


def test_metadata_nibbles_are_valid_ordered_patterns():
    values, meta = random_packed(300, 200, torch.float16, 7)
    _, a_meta = to_mma_layout(values, meta, 200)
    words = a_meta.to(torch.int64) & 0xFFFFFFFF
    nib = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], -1)
    lo, hi = nib & 3, nib >> 2
    assert bool((lo < hi).all())  # ordered metadata; excludes 0b0000, 0b0101, 0b1010, 0b1111


def test_reference_ops_agree():
    from slimc.runtime.sparse24_ops import sparse24_linear_reference, sparse24_prefill_linear_reference

    values, meta = random_packed(100, 40, torch.float32, 3)
    a_vals, a_meta = to_mma_layout(values, meta, 40)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(100, generator=torch.Generator().manual_seed(2))
    y = torch.ops.slimc.sparse24_prefill_linear(x, a_vals, a_meta, bias, 100)
    assert torch.equal(y, sparse24_prefill_linear_reference(x, a_vals, a_meta, bias, 100))
    torch.testing.assert_close(y, sparse24_linear_reference(x, values, meta, bias))


def test_bad_shapes_are_refused():
    values, meta = random_packed(16, 32, torch.float16, 1)
    with pytest.raises(ValueError):
        to_mma_layout(values, meta, 64)
