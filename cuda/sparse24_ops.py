"""Torch ops for the 2:4 kernels (`sparse24_decode.cu`, `sparse24_prefill.cu`), each with a CPU reference beside it.

    torch.ops.slimc.sparse24_linear(x, values, meta, bias) -> y     # y = x @ W^T + bias
        x [..., K] fp16/bf16 (fp32 too on the reference path), values [N, K/2], meta [N, K/8] uint8
        (the slimc-nm layout of compiler/sparse_format.py), bias [N] or None.

On CPU (or wherever the extension is not built) the op runs `sparse24_linear_reference`: unpack the
dense weight and multiply in float32. On CUDA it runs our kernel; the extension is compiled on first
use with `torch.utils.cpp_extension.load_inline` (about a minute) into `cuda/_build/`. `available()`
says whether it could be built; it never raises.

    torch.ops.slimc.sparse24_prefill_linear(x, a_vals, a_meta, bias, out_features) -> y
        the prefill kernel (many tokens, sparse tensor cores); a_vals / a_meta are the kernel layout
        made once by `cuda/sparse24_layout.py:to_mma_layout(values, meta, K)`. NOTE: the prefill
        kernel compiles but has not yet run on a GPU; tests/cuda/test_sparse24_prefill_gpu.py checks it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from ..compiler.sparse_format import unpack

_HERE = Path(__file__).resolve().parent
_BUILD_DIR = Path(os.environ.get("SLIMC_CUDA_BUILD", _HERE / "_build"))

# The binding takes the stream as an integer so it needs no CUDA headers of its own.
_BINDING = r"""
#include <torch/extension.h>

extern "C" int slimc_sparse24_decode(const void* x, const void* values, const void* meta, const void* bias, void* y,
                                     void* ws, int tokens, int N, int K, int dtype, void* stream);
extern "C" long long slimc_sparse24_workspace(int tokens, int N, int K);
extern "C" const char* slimc_sparse24_error_string(int code);
extern "C" int slimc_sparse24_prefill(const void* x, const void* a_vals, const void* a_meta, const void* bias, void* y,
                                      int tokens, int N, int K, int K_pad, int dtype, void* stream);

// Shared by both bindings: the optional bias ([N], x's dtype) and the output ([tokens, N], the
// caller's buffer when given, so tests can poison it first).
static const void* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t N, const torch::Tensor& x, const char* op) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->is_cuda() && bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == x.scalar_type(),
              op, ": bias must be a contiguous [N] CUDA tensor of x's dtype");
  return bias->data_ptr();
}

static torch::Tensor output(const c10::optional<torch::Tensor>& out, int64_t tokens, int64_t N, const torch::Tensor& x, const char* op) {
  if (!out.has_value() || !out->defined()) return torch::empty({tokens, N}, x.options());
  TORCH_CHECK(out->is_cuda() && out->is_contiguous() && out->scalar_type() == x.scalar_type() && out->dim() == 2 &&
              out->size(0) == tokens && out->size(1) == N, op, ": out must be a contiguous [tokens, N] tensor of x's dtype");
  return *out;
}

torch::Tensor sparse24_decode(torch::Tensor x, torch::Tensor values, torch::Tensor meta,
                              c10::optional<torch::Tensor> bias, int64_t stream, c10::optional<torch::Tensor> out) {
  TORCH_CHECK(x.is_cuda() && values.is_cuda() && meta.is_cuda(), "sparse24_decode: CUDA tensors expected");
  TORCH_CHECK(x.dim() == 2 && values.dim() == 2 && meta.dim() == 2, "sparse24_decode: 2-D x, values, meta expected");
  TORCH_CHECK(x.is_contiguous() && values.is_contiguous() && meta.is_contiguous(), "sparse24_decode: contiguous tensors expected");
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "sparse24_decode: x and values must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "sparse24_decode: fp16 or bf16 expected");
  TORCH_CHECK(meta.scalar_type() == at::kByte, "sparse24_decode: uint8 metadata expected");
  const int64_t tokens = x.size(0), K = x.size(1), N = values.size(0);
  TORCH_CHECK(K % 32 == 0, "sparse24_decode: K must be a multiple of 32");
  TORCH_CHECK(values.size(1) * 2 == K && meta.size(0) == N && meta.size(1) * 8 == K, "sparse24_decode: shapes do not match K");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(values.data_ptr()) % 16 == 0, "sparse24_decode: values must be 16-byte aligned");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(meta.data_ptr()) % 4 == 0, "sparse24_decode: meta must be 4-byte aligned");
  const void* bptr = bias_ptr(bias, N, x, "sparse24_decode");
  torch::Tensor y = output(out, tokens, N, x, "sparse24_decode");
  const long long ws_elems = slimc_sparse24_workspace((int)tokens, (int)N, (int)K);
  torch::Tensor ws;
  if (ws_elems > 0) ws = torch::empty({ws_elems}, x.options().dtype(at::kFloat));
  const int rc = slimc_sparse24_decode(x.data_ptr(), values.data_ptr(), meta.data_ptr(), bptr, y.data_ptr(),
                                       ws_elems > 0 ? ws.data_ptr() : nullptr, (int)tokens, (int)N, (int)K,
                                       x.scalar_type() == at::kHalf ? 0 : 1, reinterpret_cast<void*>(stream));
  TORCH_CHECK(rc == 0, "sparse24_decode kernel failed: ", slimc_sparse24_error_string(rc));
  return y;
}

torch::Tensor sparse24_prefill(torch::Tensor x, torch::Tensor a_vals, torch::Tensor a_meta, c10::optional<torch::Tensor> bias,
                               int64_t N, int64_t stream, c10::optional<torch::Tensor> out) {
  TORCH_CHECK(x.is_cuda() && a_vals.is_cuda() && a_meta.is_cuda(), "sparse24_prefill: CUDA tensors expected");
  TORCH_CHECK(x.dim() == 2 && a_vals.dim() == 4 && a_meta.dim() == 3, "sparse24_prefill: x [T, K], a_vals [N/16, K/32, 32, 8], a_meta [N/16, K/32, 16] expected");
  TORCH_CHECK(x.is_contiguous() && a_vals.is_contiguous() && a_meta.is_contiguous(), "sparse24_prefill: contiguous tensors expected");
  TORCH_CHECK(x.scalar_type() == a_vals.scalar_type(), "sparse24_prefill: x and a_vals must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "sparse24_prefill: fp16 or bf16 expected");
  TORCH_CHECK(a_meta.scalar_type() == at::kInt, "sparse24_prefill: int32 metadata expected");
  const int64_t tokens = x.size(0), K = x.size(1), K_pad = a_vals.size(1) * 32;
  TORCH_CHECK(K % 8 == 0, "sparse24_prefill: K must be a multiple of 8");
  TORCH_CHECK(a_vals.size(2) == 32 && a_vals.size(3) == 8 && a_meta.size(0) == a_vals.size(0) && a_meta.size(1) == a_vals.size(1) &&
              a_meta.size(2) == 16, "sparse24_prefill: a_vals / a_meta shapes do not match");
  TORCH_CHECK(a_vals.size(0) * 16 >= N && (a_vals.size(0) * 16) % 128 == 0, "sparse24_prefill: a_vals rows must cover N, padded to 128");
  TORCH_CHECK(K_pad % 64 == 0 && K_pad >= K && K_pad - K < 64, "sparse24_prefill: a_vals columns must be K padded to 64");
  const void* bptr = bias_ptr(bias, N, x, "sparse24_prefill");
  torch::Tensor y = output(out, tokens, N, x, "sparse24_prefill");
  const int rc = slimc_sparse24_prefill(x.data_ptr(), a_vals.data_ptr(), a_meta.data_ptr(), bptr, y.data_ptr(), (int)tokens,
                                        (int)N, (int)K, (int)K_pad, x.scalar_type() == at::kHalf ? 0 : 1,
                                        reinterpret_cast<void*>(stream));
  TORCH_CHECK(rc == 0, "sparse24_prefill kernel failed: ", slimc_sparse24_error_string(rc));
  return y;
}
"""

_lock = threading.Lock()
_ext = None
_ext_error: str | None = None


def _arch_flags() -> list[str]:
    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}{minor}"
    if cc == "90":  # Hopper: the arch-specific target (see HOPPER.md: the -gencode form)
        return ["-gencode=arch=compute_90a,code=sm_90a"]
    return [f"-gencode=arch=compute_{cc},code=sm_{cc}"]


def extension(verbose: bool = False):
    """The compiled extension, building it on first call; None if CUDA or a compiler is missing."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    with _lock:
        if _ext is not None or _ext_error is not None:
            return _ext
        if not torch.cuda.is_available():
            _ext_error = "CUDA is not available"
            return None
        try:
            from torch.utils.cpp_extension import load_inline

            _BUILD_DIR.mkdir(parents=True, exist_ok=True)
            _ext = load_inline(
                name="slimc_sparse24",
                cpp_sources=[_BINDING],
                cuda_sources=[(_HERE / "sparse24_decode.cu").read_text(), (_HERE / "sparse24_prefill.cu").read_text()],
                functions=["sparse24_decode", "sparse24_prefill"],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-std=c++17", *_arch_flags()],
                build_directory=str(_BUILD_DIR),
                verbose=verbose,
            )
        except Exception as e:  # noqa: BLE001 — no compiler / build failure: the reference path serves
            _ext_error = f"{type(e).__name__}: {e}"
    return _ext


def available() -> bool:
    """True when the CUDA kernel is built (or can be built) here."""
    return extension() is not None


def build_error() -> str | None:
    """Why the extension is not available (None when it is, or before the first attempt)."""
    return _ext_error


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
    from .sparse24_layout import mma_layout_dense

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
