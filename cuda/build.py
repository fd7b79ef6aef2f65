"""Build the 2:4 CUDA kernels (`sparse24_decode.cu`, `sparse24_prefill.cu`) into one torch extension.

    ext = extension()        # compiled on first call with torch.utils.cpp_extension.load_inline, or None
    available()              # whether it is built (or could be); never raises
    build_error()            # why not, once a build was tried

The kernels know no model: they take raw pointers and shapes. The torch ops that call them, and
their CPU references, are `slimc.runtime.sparse24_ops`. The build directory is `cuda/_build/`
(or `$SLIMC_CUDA_BUILD`); the first build takes about a minute.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

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
