"""The 2:4 prefill kernel (cuda/sparse24_prefill.cu, mma.sp) against a float64 reference (needs CUDA).

Written before the kernel ever ran on a GPU. Each check poisons the output with NaN before the run
(an element the kernel never writes fails), and compares ||y - ref|| / ||ref|| with the fp64
product: < 1e-2 for bf16, < 2e-3 for fp16. If every shape fails with errors near 1, suspect the
metadata lane/bit assignment in runtime/sparse24_layout.py first (see its docstring).
"""

from __future__ import annotations

import pytest
import torch

from slimc.runtime.sparse24_layout import to_mma_layout
from slimc.runtime.sparse_format import pack, unpack

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
BIG_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (28672, 8192), (8192, 28672)]


@pytest.fixture(scope="module")
def ops():
    from slimc.runtime import sparse24_ops

    if sparse24_ops.extension(verbose=True) is None:
        pytest.fail(f"the sparse24 extension did not build: {sparse24_ops.build_error()}")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("mma.sp needs compute capability 8.0+")
    return sparse24_ops


def random_24(n: int, k: int, dtype: torch.dtype, gen: torch.Generator):
    """Random 2:4 weight, packed (values, meta) on the GPU plus its kernel layout (a_vals, a_meta)."""
    w = torch.randn(n, k, generator=gen, device="cuda")  # made on the GPU: the big shapes are slow on CPU
    keep = torch.rand(n, k // 4, 4, generator=gen, device="cuda").argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device="cuda").scatter_(-1, keep, True).reshape(n, k)
    p = pack((w * mask).to(dtype), 2, 4)
    values, meta = p.values, p.meta
    a_vals, a_meta = to_mma_layout(values, meta, k)
    return values, meta, a_vals, a_meta


def reference(x, values, meta, bias):
    w = unpack(values, meta, 2, 4, values.shape[1] * 2).double().cuda()
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def check(ops, n, k, tokens, dtype, with_bias, gen):
    values, meta, a_vals, a_meta = random_24(n, k, dtype, gen)
    bias = torch.randn(n, generator=gen, device="cuda").to(dtype) if with_bias else None
    x = torch.randn(tokens, k, generator=gen, device="cuda").to(dtype)
    out = torch.full((tokens, n), float("nan"), dtype=dtype, device="cuda")
    ops.prefill(x, a_vals, a_meta, n, bias, out)
    torch.cuda.synchronize()
    assert not bool(torch.isnan(out).any()), f"{n}x{k} tokens={tokens}: unwritten or NaN outputs"
    err = rel_err(out, reference(x, values, meta, bias))
    assert err < TOL[dtype], f"{n}x{k} tokens={tokens} bias={with_bias}: rel err {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 64), (16, 32), (100, 40), (576, 1536), (1000, 1000), (50, 2080)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_small_and_ragged_shapes(ops, dtype, shape):
    n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(n * 7 + k)
    for tokens in [1, 7, 128, 129, 255, 256, 257, 300, 1023]:
        check(ops, n, k, tokens, dtype, tokens % 2 == 1, gen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [256, 4096])
@pytest.mark.parametrize("shape", BIG_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_target_shapes(ops, dtype, tokens, shape):
    n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(n + k + tokens)
    check(ops, n, k, tokens, dtype, True, gen)
    if tokens == 256:
        check(ops, n, k, tokens + 77, dtype, False, gen)  # odd token count, no bias


def test_same_inputs_give_identical_outputs(ops):
    gen = torch.Generator(device="cuda").manual_seed(1)
    _, _, a_vals, a_meta = random_24(4096, 4096, torch.float16, gen)
    x = torch.randn(1000, 4096, generator=gen, device="cuda").half()
    assert torch.equal(ops.prefill(x, a_vals, a_meta, 4096), ops.prefill(x, a_vals, a_meta, 4096))


def test_torch_op_and_batch_dims(ops):
    gen = torch.Generator(device="cuda").manual_seed(2)
    values, meta, a_vals, a_meta = random_24(256, 512, torch.bfloat16, gen)
    x = torch.randn(2, 300, 512, generator=gen, device="cuda").bfloat16()
    y = torch.ops.slimc.sparse24_prefill_linear(x, a_vals, a_meta, None, 256)
    assert y.shape == (2, 300, 256)
    ref = reference(x.reshape(600, 512), values, meta, None).reshape(2, 300, 256)
    assert rel_err(y, ref) < TOL[torch.bfloat16]


def test_sparse_linear_prefill_kernel_and_dense_paths_agree(ops, monkeypatch):
    from slimc.runtime import sparse_linear
    from slimc.runtime.sparse_linear import DISPATCHER, SparseLinear

    monkeypatch.setattr(sparse_linear.DISPATCHER, "prefill_enabled", True)  # opt-in until validated on a GPU

    gen = torch.Generator(device="cuda").manual_seed(3)
    values, meta, _, _ = random_24(512, 1024, torch.float16, gen)
    layer = SparseLinear(1024, 512, 2, 4, bias=True, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        layer.values.copy_(values)
        layer.metadata.copy_(meta)
        layer.bias.normal_()
    x = torch.randn(300, 1024, generator=gen, device="cuda").half()
    ref = reference(x, values, meta, layer.bias)
    try:
        DISPATCHER.force = True
        y_kernel = layer(x)
        assert layer._prefill is not None  # the converted layout is cached on the layer
        DISPATCHER.force = False
        y_dense = layer(x)
    finally:
        DISPATCHER.force = None
    assert rel_err(y_kernel, ref) < TOL[torch.float16] and rel_err(y_dense, ref) < TOL[torch.float16]
    layer(x)  # measured choice, cached
    assert any(key[2:] == (512, 1024, 512) for key in DISPATCHER.choices)
