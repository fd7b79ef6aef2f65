"""LLM structured pruning, the whole family side by side on SmolLM2-135M-Instruct: prints the table for BENCHMARKS.md.

Protocol (as benchmarks/flap.py): float32; calibration 128 windows x 128 tokens of the pydoc
calibration split, seed 0 (NIRVANA's saliency: 32 x 128, as its recipe); evaluation = perplexity on
16 non-overlapping 512-token windows from the start of the pydoc evaluation split. A second
column, `calib-val`, is the perplexity on 16 x 512 windows drawn (seed 1) from the calibration
split: the only number used to choose the `llm-prune-*` recipes, so the choice never sees the
evaluation text.

The statistics every row needs (output-projection input moments with Gram matrices, block
angles, max-logit and loss saliency) are collected once and cached (`--cache`), then each row
plans, compensates and cuts a copy of the dense model.

    python benchmarks/llm_prune.py --cache /tmp/llm_prune_cache.pt                 # recipes + references
    python benchmarks/llm_prune.py --cache /tmp/c.pt --rows search                 # also the llm-prune search grid
    python benchmarks/llm_prune.py --cache /tmp/c.pt --sparsity 0.5 --only cfsp nirvana
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from slimc.compiler.calibration.evaluation import heldout_tokens, perplexity
from slimc.compiler.calibration.gradients import parameter_saliency
from slimc.compiler.calibration.sources import draw_windows, open_source, pydoc_split
from slimc.compiler.calibration.stats import collect_layer_stats
from slimc.compiler.pipeline.recipes import load_recipe
from slimc.passes.cfsp import Cfsp
from slimc.passes.llm_prune import LlmPrune
from slimc.passes.nirvana import Nirvana
from slimc.passes.structured.units import decoder_units

RECIPES = ("flap-{}", "flap-lsq-{}", "cfsp-{}", "nirvana-{}", "llm-prune-{}")


def search_rows(p: float) -> dict[str, object]:
    """The llm-prune grid: the criteria with least-squares compensation under the two pooled allocators,
    and a few allocator / normalisation variants of the strongest."""
    rows: dict[str, object] = {}
    for crit in ("flap-wifv", "wanda-sp", "obs", "saliency", "taylor", "cfsp"):
        normalize = crit in ("wanda-sp", "saliency", "taylor", "cfsp")  # obs costs are comparable as they are
        for alloc in ("global", "per-module"):
            rows[f"llm-prune {crit} {alloc} lsq{' z' if normalize else ''}"] = LlmPrune(
                sparsity=p, criterion=crit, allocator=alloc, compensation="lsq", normalize=normalize)
    rows["llm-prune obs global lsq z"] = LlmPrune(sparsity=p, criterion="obs", allocator="global", compensation="lsq", normalize=True)
    rows["llm-prune obs global lsq-seq"] = LlmPrune(sparsity=p, criterion="obs", allocator="global", compensation="lsq-seq")
    rows["llm-prune saliency two-pools lsq"] = LlmPrune(sparsity=p, criterion="saliency", allocator="two-pools", gamma=20.0, compensation="lsq")
    rows["llm-prune cfsp block-sigmoid lsq"] = LlmPrune(sparsity=p, criterion="cfsp", allocator="block-sigmoid", temperature=0.2, compensation="lsq")
    return rows


def reference_rows(p: float, gammas: list[float], temperatures: list[float]) -> dict[str, object]:
    """The references' own choices where they differ from the recipes, and their main knobs."""
    rows: dict[str, object] = {}
    for t in temperatures:
        rows[f"cfsp T={t}"] = Cfsp(sparsity=p, temperature=t)
        rows[f"cfsp T={t} (released code's fine score)"] = Cfsp(sparsity=p, temperature=t, code_faithful=True)
    for g in gammas:
        rows[f"nirvana gamma {g}"] = Nirvana(sparsity=p, gamma=g)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--rows", choices=["recipes", "references", "search", "all"], default="references",
                    help="recipes only; recipes + references (default); recipes + the llm-prune grid; everything")
    ap.add_argument("--only", nargs="*", help="keep rows whose name contains one of these words")
    ap.add_argument("--cache", help="save/reuse the collected statistics at this path")
    ap.add_argument("--gammas", type=float, nargs="*", default=[2.0, 4.0], help="NIRVANA reference rows: these gammas")
    ap.add_argument("--temperatures", type=float, nargs="*", default=[0.61], help="CFSP reference rows: these temperatures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import slimc

    t0 = time.perf_counter()
    dense = slimc.load("smollm2")
    print(f"# loaded SmolLM2 in {time.perf_counter() - t0:.1f} s; load avg {os.getloadavg()[0]:.2f}", flush=True)
    held = heldout_tokens(dense.tokenizer)
    val = draw_windows(pydoc_split(dense.tokenizer, "calibration"), args.eval_windows, 512, seed=1)
    source = open_source("pydoc")
    tokens = source.windows(dense.tokenizer, 128, 128, 0)
    sal_tokens = source.windows(dense.tokenizer, 32, 128, 0)

    if args.cache and os.path.exists(args.cache):
        cache = torch.load(args.cache, weights_only=False)
    else:
        t = time.perf_counter()
        layers = decoder_units(dense)
        projs = [u.out_proj for pair in layers for u in pair]
        params = sorted({s.param for pair in layers for u in pair for s in u.group.slices})
        cache = {"stats": collect_layer_stats(dense, tokens, projs, gram=True, block_angles=True)}
        print(f"# input moments + Gram + block angles {time.perf_counter() - t:.1f} s", flush=True)
        for objective, toks in (("max_logit", sal_tokens), ("loss", tokens)):
            t = time.perf_counter()
            cache[objective] = parameter_saliency(dense, toks, params, objective=objective)
            print(f"# saliency ({objective}) {time.perf_counter() - t:.1f} s", flush=True)
        if args.cache:
            torch.save(cache, args.cache)

    def ppl(model) -> tuple[float, float]:
        return perplexity(model, held, 512, args.eval_windows), perplexity(model, val, 512)

    base = ppl(dense)
    results = [("dense", 0.0, 0.0, dense.num_parameters(), *base, 0.0)]
    print(f"# dense: eval {base[0]:.2f}, calib-val {base[1]:.2f}", flush=True)
    for p in args.sparsity:
        pct = int(round(p * 100))
        rows: dict[str, object] = {}
        for r in RECIPES:
            try:
                (rows[r.format(pct)],) = load_recipe(r.format(pct)).build()
            except slimc.SlimcError:
                continue
        if args.rows in ("references", "all"):
            rows.update(reference_rows(p, args.gammas, args.temperatures))
        if args.rows in ("search", "all"):
            rows.update(search_rows(p))
        if args.only:
            rows = {k: v for k, v in rows.items() if any(w in k for w in args.only)}
        for name, ps in rows.items():
            m = dense.clone()
            objective = next((n.split(":")[1] for n in ps.criterion().needs if n.startswith("saliency:")), None)
            t = time.perf_counter()
            plan = ps.plan(m, tokens, (cache["stats"], cache[objective] if objective else {}))
            ps.apply(m, plan, tokens)
            dt = time.perf_counter() - t
            e, v = ppl(m)
            results.append((name, p, plan.stats["sparsity"], m.num_parameters(), e, v, dt))
            print(f"# {name} p={p}: eval {e:.2f}, calib-val {v:.2f}, sparsity {plan.stats['sparsity']:.4f}, {dt:.1f} s", flush=True)
            del m

    print()
    print("| method | target p | achieved p (attn+MLP) | params | PPL eval (16x512) | PPL calib-val | prune s after collection |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, p, got, n, e, v, dt in results:
        print(f"| {name} | {p:.2f} | {got:.4f} | {n:,} | {e:.2f} | {v:.2f} | {dt:.1f} |")
    print(f"\npeak RSS of the benchmark process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
