"""2:4 sparse x dense products on the GPU: dense cuBLAS vs PyTorch cuSPARSELt vs our decode and prefill kernels.

    python benchmarks/sparse24.py                    # default shapes and token counts, fp16
    python benchmarks/sparse24.py --dtype bf16 --tokens 1 16 64 --shapes 4096x4096 11008x4096
    python benchmarks/sparse24.py --prefill            # prefill token counts 256..16384 and shapes

For each weight shape (N x K) and token count m it times y = x W^T with
  dense      F.linear (cuBLAS) on the dense weight, eager; dense+g from a CUDA graph
  cslt       PyTorch semi-structured sparse (to_sparse_semi_structured, cuSPARSELt backend), eager
  cslt+g     the same replayed from a CUDA graph
  ours       torch.ops.slimc.sparse24_linear (cuda/sparse24_decode.cu), eager, for m <= 64
  ours+g     the same replayed from a CUDA graph
  pre        torch.ops.slimc.sparse24_prefill_linear (cuda/sparse24_prefill.cu, mma.sp), for m >= 256;
             weight layout converted once before timing (not timed)
  pre+g      the same replayed from a CUDA graph
Every method is first checked against the dense result (relative error printed). Timing follows
.library/device/METHOD.md: warm-up, CUDA events, median of `--repeats`; each timed region runs the
method over enough weight copies (> 2x L2) that the weights come from device memory, not L2.
The ratio columns are dense time / method time (> 1: faster than dense). The memory floor is
values + metadata (9/16 of the dense fp16 bytes) over the measured copy bandwidth.
Without CUDA it exits with a message; it never falls back to the CPU.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from slimc.runtime.sparse_linear import DECODE_MAX_TOKENS, PREFILL_MIN_TOKENS, cuda_median_ms

DEFAULT_SHAPES = ["576x576", "1536x576", "576x1536", "4096x4096", "11008x4096", "4096x11008", "14336x4096", "28672x8192"]
DEFAULT_TOKENS = [1, 4, 16, 64]
PREFILL_SHAPES = ["4096x4096", "11008x4096", "4096x11008", "14336x4096", "28672x8192", "8192x28672"]
PREFILL_TOKENS = [256, 1024, 4096, 16384]


def parse_shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


def random_24(n: int, k: int, dtype: torch.dtype, device: str = "cuda") -> torch.Tensor:
    """A random 2:4 dense weight (zeros in place), made on the GPU."""
    w = torch.randn(n, k, device=device, dtype=torch.float32)
    idx = torch.rand(n, k // 4, 4, device=device).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=device).scatter_(-1, idx, True).reshape(n, k)
    return (w * mask).to(dtype)


def graphed(fn):
    """Capture `fn` in a CUDA graph; returns the replay, or None when capture fails."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            fn()
    except Exception:  # noqa: BLE001 — some backends cannot be captured; reported as n/a
        return None
    return g.replay


def copy_bandwidth_gbs() -> float:
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), 20)
    return 2 * src.numel() / ms / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=None, help="N x K weight shapes")
    ap.add_argument("--tokens", nargs="+", type=int, default=None)
    ap.add_argument("--prefill", action="store_true", help="default to the prefill shapes and token counts (256..16384)")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--no-cslt", action="store_true", help="skip PyTorch's cuSPARSELt path")
    args = ap.parse_args()
    if args.shapes is None:
        args.shapes = PREFILL_SHAPES if args.prefill else DEFAULT_SHAPES
    if args.tokens is None:
        args.tokens = PREFILL_TOKENS if args.prefill else DEFAULT_TOKENS
    if not torch.cuda.is_available():
        print("benchmarks/sparse24.py needs a CUDA GPU (none is visible here); run it on a machine with one.", file=sys.stderr)
        return 2

    from slimc.runtime import sparse24_ops
    from slimc.runtime.sparse24_layout import to_mma_layout
    from slimc.runtime.sparse_format import pack

    if sparse24_ops.extension(verbose=False) is None:
        print(f"the sparse24 extension did not build: {sparse24_ops.build_error()}", file=sys.stderr)
        return 1
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    bw = copy_bandwidth_gbs()
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, copy bandwidth {bw:.0f} GB/s, {args.dtype}")

    rows = []
    for shape in args.shapes:
        n, k = parse_shape(shape)
        dense_bytes = n * k * 2
        copies = max(1, min(16, -(-2 * l2 // (dense_bytes * 9 // 16))))
        weights = [random_24(n, k, dtype) for _ in range(copies)]
        packed = [pack(w, 2, 4) for w in weights]
        layouts = [to_mma_layout(p.values, p.meta, k) for p in packed] if max(args.tokens) >= PREFILL_MIN_TOKENS else []
        cslt = None
        if not args.no_cslt:
            try:
                from torch.sparse import to_sparse_semi_structured

                cslt = [to_sparse_semi_structured(w) for w in weights]
            except Exception as e:  # noqa: BLE001
                print(f"{shape}: cuSPARSELt unavailable ({type(e).__name__}: {e})")
        for m in args.tokens:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = F.linear(x.float(), weights[0].float())
            ours_fn = lambda: [torch.ops.slimc.sparse24_linear(x, p.values, p.meta, None) for p in packed]  # noqa: E731
            dense_fn = lambda: [F.linear(x, w) for w in weights]  # noqa: E731
            decode = m <= DECODE_MAX_TOKENS  # the decode kernel is not meant for (nor timed at) prefill sizes
            err_ours = t_ours = t_ours_g = float("nan")
            if decode:
                err_ours = float((torch.ops.slimc.sparse24_linear(x, packed[0].values, packed[0].meta, None).float() - ref).norm() / ref.norm())
            t_dense = cuda_median_ms(dense_fn, args.repeats) / copies
            g = graphed(dense_fn)
            t_dense_g = cuda_median_ms(g, args.repeats) / copies if g else float("nan")
            if decode:
                t_ours = cuda_median_ms(ours_fn, args.repeats) / copies
                g = graphed(ours_fn)
                t_ours_g = cuda_median_ms(g, args.repeats) / copies if g else float("nan")
            t_pre = t_pre_g = err_pre = float("nan")
            if m >= PREFILL_MIN_TOKENS and layouts:
                pre_fn = lambda: [torch.ops.slimc.sparse24_prefill_linear(x, a, e, None, n) for a, e in layouts]  # noqa: E731
                try:
                    y_pre = torch.ops.slimc.sparse24_prefill_linear(x, layouts[0][0], layouts[0][1], None, n)
                    err_pre = float((y_pre.float() - ref).norm() / ref.norm())
                    t_pre = cuda_median_ms(pre_fn, args.repeats) / copies
                    g = graphed(pre_fn)
                    t_pre_g = cuda_median_ms(g, args.repeats) / copies if g else float("nan")
                except Exception as e:  # noqa: BLE001 — a failing kernel is reported, the others still run
                    print(f"{shape} m={m}: prefill kernel failed ({type(e).__name__}: {e})")
            t_cslt = t_cslt_g = float("nan")
            err_cslt = float("nan")
            if cslt is not None:
                try:
                    cslt_fn = lambda: [F.linear(x, w) for w in cslt]  # noqa: E731
                    err_cslt = float((F.linear(x, cslt[0]).float() - ref).norm() / ref.norm())
                    t_cslt = cuda_median_ms(cslt_fn, args.repeats) / copies
                    g = graphed(cslt_fn)
                    t_cslt_g = cuda_median_ms(g, args.repeats) / copies if g else float("nan")
                except Exception as e:  # noqa: BLE001
                    print(f"{shape} m={m}: cuSPARSELt failed ({type(e).__name__}: {e})")
            floor_us = dense_bytes * 9 / 16 / bw / 1e3
            rows.append((shape, m, t_dense, t_dense_g, t_cslt, t_cslt_g, t_ours, t_ours_g, floor_us, err_ours, err_cslt,
                         t_pre, t_pre_g, err_pre))
            print(f"{shape} m={m}: dense {t_dense * 1e3:.1f} us, ours {t_ours * 1e3:.1f} us (graph {t_ours_g * 1e3:.1f}), "
                  f"prefill {t_pre * 1e3:.1f} us (graph {t_pre_g * 1e3:.1f}), err {err_ours:.1e} / {err_pre:.1e}", flush=True)
        weights = packed = cslt = layouts = None  # free the copies before the next shape
        torch.cuda.empty_cache()

    print()
    print("ratios: dense/X, eager against eager dense, graph against graph dense (> 1: X is faster); cslt/pre: cuSPARSELt eager over prefill eager")
    print("| shape (N x K) | m | dense us | dense+g us | cslt us | cslt+g us | ours us | ours+g us | floor us "
          "| dense/cslt | dense/cslt (g) | dense/ours | dense/ours (g) | err ours | err cslt "
          "| pre us | pre+g us | dense/pre | dense/pre (g) | cslt/pre | err pre |")
    print("| --- " * 21 + "|")
    for shape, m, td, tdg, tc, tcg, to, tog, fl, eo, ec, tp, tpg, ep in rows:
        us = lambda t: f"{t * 1e3:.1f}"  # noqa: E731
        print(f"| {shape} | {m} | {us(td)} | {us(tdg)} | {us(tc)} | {us(tcg)} | {us(to)} | {us(tog)} | {fl:.1f} | "
              f"{td / tc:.2f}x | {tdg / tcg:.2f}x | {td / to:.2f}x | {tdg / tog:.2f}x | {eo:.1e} | {ec:.1e} "
              f"| {us(tp)} | {us(tpg)} | {td / tp:.2f}x | {tdg / tpg:.2f}x | {tc / tp:.2f}x | {ep:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
