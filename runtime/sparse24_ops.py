"""Torch ops for the 2:4 kernels (`sparse24_decode.cu`, `sparse24_prefill.cu`), each with a CPU reference beside it.

    torch.ops.slimc.sparse24_linear(x, values, meta, bias) -> y     # y = x @ W^T + bias
        x [..., K] fp16/bf16 (fp32 too on the reference path), values [N, K/2], meta [N, K/8] uint8
        (the slimc-nm layout of runtime/sparse_format.py), bias [N] or None.

On CPU (or wherever the extension is not built) the op runs `sparse24_linear_reference`: unpack the
dense weight and multiply in float32. On CUDA it runs our kernel, built on first use by
`slimc.cuda.build.extension` (about a minute); `available()` says whether it could be built and
never raises.

    torch.ops.slimc.sparse24_prefill_linear(x, a_vals, a_meta, bias, out_features) -> y
        the prefill kernel (many tokens, sparse tensor cores); a_vals / a_meta are the kernel layout
        made once by `runtime/sparse24_layout.py:to_mma_layout(values, meta, K)`. NOTE: the prefill
        kernel compiles but has not yet run on a GPU; tests/cuda/test_sparse24_prefill_gpu.py checks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimc.cuda.build import available, build_error, extension
from slimc.runtime.sparse_format import unpack

__all__ = ["available", "build_error", "extension", "kernel_supports", "prefill_supports", "sparse24_linear",
           "sparse24_prefill_linear", "decode", "prefill"]


def kernel_supports(x: torch.Tensor, values: torch.Tensor) -> bool:
    """Shapes and dtypes the decode kernel handles (anything else takes the dense path)."""
    k = x.shape[-1]
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and values.dtype == x.dtype
        and k % 32 == 0
        and values.shape[1] * 2 == k
    )


def sparse24_linear_reference(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """CPU reference: dense weight from the packed format, product in float32, result in x's dtype."""
    k = values.shape[1] * 2
    w = unpack(values, meta, 2, 4, k)
    out = F.linear(x.to(torch.float32), w.to(torch.float32), None if bias is None else bias.to(torch.float32))
    return out.to(x.dtype)


@torch.library.custom_op("slimc::sparse24_linear", mutates_args=())
def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b with W 2:4-packed; the default (CPU) implementation is the reference."""
    return sparse24_linear_reference(x, values, meta, bias)


@sparse24_linear.register_kernel("cuda")
def _sparse24_linear_cuda(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    ext = extension()
    if ext is None or not kernel_supports(x, values):
        return sparse24_linear_reference(x, values, meta, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = decode(x2, values, meta, bias)
    return y.reshape(*lead, values.shape[0])


def decode(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Run the CUDA kernel directly: x [tokens, K] -> [tokens, N], written into `out` when given."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"the sparse24 CUDA extension is not available: {build_error()}")
    stream = torch.cuda.current_stream(x.device).cuda_stream
    return ext.sparse24_decode(x.contiguous(), values.contiguous(), meta.contiguous(), bias, stream, out)


@sparse24_linear.register_fake
def _sparse24_linear_fake(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], values.shape[0]))


# ---- prefill: the sparse-tensor-core kernel (sparse24_prefill.cu), weights in the kernel layout ----


def prefill_supports(x: torch.Tensor, weights: torch.Tensor) -> bool:
    """Inputs, dtypes and GPUs the prefill kernel handles (compute capability >= 8.0: mma.sp);
    `weights` is the layer's packed values or their kernel layout (only its dtype is read)."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and weights.dtype == x.dtype
        and x.shape[-1] % 8 == 0
        and torch.cuda.get_device_capability(x.device)[0] >= 8
    )


def _layout_fits(x: torch.Tensor, a_vals: torch.Tensor) -> bool:
    """a_vals is a kernel layout whose K, padded to 64, covers x's."""
    return a_vals.dim() == 4 and 0 <= a_vals.shape[1] * 32 - x.shape[-1] < 64


def sparse24_prefill_linear_reference(
    x: torch.Tensor, a_vals: torch.Tensor, a_meta: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """CPU reference: dense weight decoded from the kernel layout, product in float32, result in x's dtype."""
    from slimc.runtime.sparse24_layout import mma_layout_dense

    w = mma_layout_dense(a_vals, a_meta, out_features, x.shape[-1])
    out = F.linear(x.to(torch.float32), w.to(torch.float32), None if bias is None else bias.to(torch.float32))
    return out.to(x.dtype)


@torch.library.custom_op("slimc::sparse24_prefill_linear", mutates_args=())
def sparse24_prefill_linear(
    x: torch.Tensor, a_vals: torch.Tensor, a_meta: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """y = x W^T + b with W in the prefill kernel layout; the default (CPU) implementation is the reference."""
    return sparse24_prefill_linear_reference(x, a_vals, a_meta, bias, out_features)


@sparse24_prefill_linear.register_kernel("cuda")
def _sparse24_prefill_linear_cuda(
    x: torch.Tensor, a_vals: torch.Tensor, a_meta: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    ext = extension()
    if ext is None or not prefill_supports(x, a_vals) or not _layout_fits(x, a_vals):
        return sparse24_prefill_linear_reference(x, a_vals, a_meta, bias, out_features)
    lead = x.shape[:-1]
    y = prefill(x.reshape(-1, x.shape[-1]).contiguous(), a_vals, a_meta, out_features, bias)
    return y.reshape(*lead, out_features)


@sparse24_prefill_linear.register_fake
def _sparse24_prefill_linear_fake(
    x: torch.Tensor, a_vals: torch.Tensor, a_meta: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def prefill(
    x: torch.Tensor,
    a_vals: torch.Tensor,
    a_meta: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the prefill kernel directly: x [tokens, K] -> [tokens, N], written into `out` when given."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"the sparse24 CUDA extension is not available: {build_error()}")
    stream = torch.cuda.current_stream(x.device).cuda_stream
    return ext.sparse24_prefill(x.contiguous(), a_vals.contiguous(), a_meta.contiguous(), bias, out_features, stream, out)
