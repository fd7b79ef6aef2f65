"""The 2:4 decode kernel against a float64 reference (needs CUDA; skipped without it).

Each check draws fresh random inputs, poisons the output with NaN before the run (so an element the
kernel never writes fails), and compares ||y - ref|| / ||ref|| with the fp64 product:
< 1e-2 for bf16, < 2e-3 for fp16 (METHOD.md's bands for 16-bit operands, fp32 accumulation).
"""

from __future__ import annotations

import pytest
import torch

from slimc.runtime.sparse_format import pack, unpack

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def ops():
    from slimc.runtime import sparse24_ops

    if sparse24_ops.extension(verbose=True) is None:
        pytest.fail(f"the sparse24 extension did not build: {sparse24_ops.build_error()}")
    return sparse24_ops


def random_24(n: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random 2:4 weight on the GPU, packed: (values, meta)."""
    w = torch.randn(n, k, generator=gen)
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    p = pack((w * mask).to(dtype), 2, 4)
    return p.values.cuda(), p.meta.cuda()


def reference(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    w = unpack(values.cpu(), meta.cpu(), 2, 4, values.shape[1] * 2).double()
    y = x.cpu().double() @ w.T
    return y if bias is None else y + bias.cpu().double()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.cpu().double() - ref).norm() / ref.norm())


SHAPES = [(64, 128), (576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (96, 8192), (50, 2080)]
TOKENS = [1, 2, 3, 5, 8, 13, 16, 17, 33, 64]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_matches_fp64_reference(ops, dtype, shape):
    n, k = shape
    gen = torch.Generator().manual_seed(n * 7 + k)
    for tokens in TOKENS:
        values, meta = random_24(n, k, dtype, gen)
        bias = torch.randn(n, generator=gen).to(dtype).cuda() if tokens % 2 else None
        x = torch.randn(tokens, k, generator=gen).to(dtype).cuda()
        out = torch.full((tokens, n), float("nan"), dtype=dtype, device="cuda")
        ops.decode(x, values, meta, bias, out)
        torch.cuda.synchronize()
        assert not bool(torch.isnan(out).any()), f"unwritten or NaN outputs at tokens={tokens}"
        err = rel_err(out, reference(x, values, meta, bias))
        assert err < TOL[dtype], f"tokens={tokens}: rel err {err:.2e}"


def test_same_inputs_give_identical_outputs(ops):
    # no atomics: a result that moves between runs would be a race
    gen = torch.Generator().manual_seed(1)
    values, meta = random_24(96, 8192, torch.float16, gen)  # split-K path
    x = torch.randn(7, 8192, generator=gen).half().cuda()
    a = ops.decode(x, values, meta)
    b = ops.decode(x, values, meta)
    assert torch.equal(a, b)


def test_torch_op_and_batch_dims(ops):
    gen = torch.Generator().manual_seed(2)
    values, meta = random_24(256, 512, torch.bfloat16, gen)
    x = torch.randn(2, 3, 512, generator=gen).bfloat16().cuda()
    y = torch.ops.slimc.sparse24_linear(x, values, meta, None)
    assert y.shape == (2, 3, 256)
    ref = reference(x.reshape(6, 512), values, meta, None).reshape(2, 3, 256)
    assert rel_err(y, ref) < TOL[torch.bfloat16]


def test_sparse_linear_on_cuda_kernel_and_dense_paths_agree(ops):
    from slimc.runtime.sparse_linear import DISPATCHER, SparseLinear

    gen = torch.Generator().manual_seed(3)
    values, meta = random_24(512, 1024, torch.float16, gen)
    layer = SparseLinear(1024, 512, 2, 4, bias=True, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        layer.values.copy_(values)
        layer.metadata.copy_(meta)
        layer.bias.normal_()
    x = torch.randn(4, 1024, generator=gen).half().cuda()
    ref = reference(x, values, meta, layer.bias)
    try:
        DISPATCHER.force = True
        y_kernel = layer(x)
        DISPATCHER.force = False
        y_dense = layer(x)
    finally:
        DISPATCHER.force = None
    assert rel_err(y_kernel, ref) < TOL[torch.float16] and rel_err(y_dense, ref) < TOL[torch.float16]
    layer(x)  # measured choice, cached
    assert any(key[2:4] == (512, 1024) for key in DISPATCHER.choices)


def test_unsupported_shapes_fall_back_to_the_reference(ops):
    from slimc.runtime.sparse_linear import SparseLinear

    gen = torch.Generator().manual_seed(4)
    w = torch.randn(16, 40, generator=gen)
    w = w * (w.abs().reshape(16, 10, 4).argsort(-1).argsort(-1) >= 2).reshape(16, 40)
    layer = SparseLinear(40, 16, 2, 4, bias=False)  # K = 40: not a multiple of 32
    p = pack(w, 2, 4)
    with torch.no_grad():
        layer.values.copy_(p.values)
        layer.metadata.copy_(p.meta)
    layer = layer.half().cuda()
    x = torch.randn(3, 40, generator=gen).half().cuda()
    assert rel_err(layer(x), x.cpu().double() @ w.double().T) < TOL[torch.float16]
