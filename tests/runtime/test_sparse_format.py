"""The slimc-nm packed format: exact round trips, the documented 2:4 byte layout, refusals."""

from __future__ import annotations

import pytest
import torch

from slimc.errors import SlimcError
from slimc.runtime.sparse_format import index_bits, is_nm_sparse, pack, pack_positions, packed_nbytes, unpack, unpack_positions


def nm_weight(out: int, inp: int, n: int, m: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g).to(dtype)
    keep = torch.rand(out, inp // m, m, generator=g).argsort(-1)[..., :n]
    mask = torch.zeros(out, inp // m, m, dtype=torch.bool).scatter_(-1, keep, True).reshape(out, inp)
    return torch.where(mask, w, torch.zeros((), dtype=dtype))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2), (3, 16), (2, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(n, m, dtype):
    w = nm_weight(5, 64, n, m, seed=n * 100 + m, dtype=dtype)
    p = pack(w, n, m)
    assert p.values.shape == (5, 64 // m * n) and p.values.dtype == dtype
    assert p.meta.dtype == torch.uint8 and p.meta.shape == (5, 64 // m * n * index_bits(m) // 8)
    assert torch.equal(unpack(p.values, p.meta, n, m, 64), w)


def test_groups_with_fewer_than_n_nonzeros_pad_with_zeros():
    w = nm_weight(4, 32, 2, 4, seed=1)
    w[0, :8] = 0.0  # two empty groups
    w[1, 4:8] = torch.tensor([0.0, 0.0, 0.0, 3.0])  # one non-zero only
    p = pack(w, 2, 4)
    assert torch.equal(unpack(p.values, p.meta, 2, 4, 32), w)
    # padding positions are distinct from the kept one, so the scatter cannot overwrite the value
    pos = unpack_positions(p.meta, 2, 16)[1, 2:4]
    assert sorted(pos.tolist()) == [0, 3]


def test_2of4_byte_layout_matches_the_documented_one():
    # row: group0 keeps columns 1, 3; group1 keeps columns 0, 2 -> positions 1,3,0,2
    w = torch.zeros(1, 8)
    w[0, 1], w[0, 3], w[0, 4], w[0, 6] = 1.0, 2.0, 3.0, 4.0
    p = pack(w, 2, 4)
    assert p.values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    # little-endian 2-bit fields: 1 | 3<<2 | 0<<4 | 2<<6 = 1 + 12 + 0 + 128
    assert p.meta.tolist() == [[141]]


def test_position_packing_round_trips_for_every_width():
    g = torch.Generator().manual_seed(3)
    for bits in (2, 4, 8):
        pos = torch.randint(0, 2**bits, (3, 16), generator=g)
        assert torch.equal(unpack_positions(pack_positions(pos, bits), bits, 16), pos)


def test_dense_weight_is_refused_with_advice():
    with pytest.raises(SlimcError, match="nm pass"):
        pack(torch.randn(2, 8), 2, 4)


def test_bad_shapes_and_patterns_are_refused():
    with pytest.raises(SlimcError, match="divisible"):
        pack(torch.zeros(2, 6), 2, 4)
    with pytest.raises(SlimcError, match="N < M"):
        pack(torch.zeros(2, 8), 4, 4)
    with pytest.raises(SlimcError, match="2-D"):
        pack(torch.zeros(8), 2, 4)


def test_is_nm_sparse_and_byte_count():
    w = nm_weight(3, 16, 2, 4)
    assert is_nm_sparse(w, 2, 4) and not is_nm_sparse(w, 1, 4)
    assert not is_nm_sparse(torch.zeros(2, 6), 2, 4)
    # fp16 2:4: 50% values + 2 bits per kept value = 9/16 of the dense bytes
    assert packed_nbytes(4096, 4096, 2, 4, 2) * 16 == 4096 * 4096 * 2 * 9
