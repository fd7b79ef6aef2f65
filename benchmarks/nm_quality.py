"""SmolLM2-135M perplexity on the held-out pydoc split: dense vs N:M by magnitude / Wanda / SparseGPT.

    python benchmarks/nm_quality.py                       # 2:4, all three methods (CPU, several minutes)
    python benchmarks/nm_quality.py --pattern 4:8 --methods wanda sparsegpt

Evaluation: `compiler.calibration.evaluation.perplexity` on `heldout_tokens` (the second half of the pydoc token
stream), `--windows` non-overlapping windows of `--eval-seq-len` tokens. Calibration: `--samples`
windows of `--seq-len` tokens from the first half (never overlapping the evaluation text).
Prints a markdown table (the one pasted into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--samples", type=int, default=128, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows")
    ap.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window")
    ap.add_argument("--sequential", action="store_true", help="also run wanda/sparsegpt with sequential calibration")
    ap.add_argument("--skip-one-shot", action="store_true", help="with --sequential: only the sequential runs")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the test machine is shared)")
    ap.add_argument("--model", default="smollm2", help="model path or alias")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from slimc.compiler.calibration.evaluation import heldout_tokens, perplexity
    from slimc.compiler.frontends.loaders import load
    from slimc.compiler.pipeline.passes import PassContext
    from slimc.passes.nm import NM

    n, m = (int(v) for v in args.pattern.split(":"))
    t0 = time.perf_counter()
    base = load(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", flush=True)
    held_out = heldout_tokens(base.tokenizer)
    rows = []

    def evaluate(label: str, model, seconds: float, sparsity: float) -> None:
        t = time.perf_counter()
        ppl = perplexity(model, held_out, args.eval_seq_len, args.windows)
        rows.append((label, sparsity, ppl, seconds))
        print(f"{label}: ppl {ppl:.3f} (compress {seconds:.1f}s, eval {time.perf_counter() - t:.1f}s)", flush=True)

    evaluate("dense", base, 0.0, 0.0)
    runs = [(method, False) for method in args.methods if not (args.sequential and args.skip_one_shot)]
    if args.sequential:
        runs += [(method, True) for method in args.methods if method != "magnitude"]
    for method, sequential in runs:
        model = base.clone()
        t = time.perf_counter()
        nm = NM(n=n, m=m, method=method, format="dense", samples=args.samples, seq_len=args.seq_len, sequential=sequential)
        res = nm(model, PassContext(seed=0))
        evaluate(f"{n}:{m} {method}{' (sequential)' if sequential else ''}", model, time.perf_counter() - t, res.stats["sparsity"])
        del model

    print()
    print(f"SmolLM2-135M-Instruct ({args.model}), pydoc held-out split, {args.windows} x {args.eval_seq_len} tokens; "
          f"calibration {args.samples} x {args.seq_len} tokens (pydoc calibration split, seed 0); "
          f"decoder q/k/v/o/gate/up/down pruned, embeddings and lm_head dense")
    print()
    print("| model | sparsity of pruned layers | perplexity | x dense | compress time (s) |")
    print("| --- | --- | --- | --- | --- |")
    dense_ppl = rows[0][2]
    for label, sparsity, ppl, seconds in rows:
        print(f"| {label} | {sparsity:.3f} | {ppl:.2f} | {ppl / dense_ppl:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
