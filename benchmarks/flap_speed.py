"""FLAP prefill speed on CPU: dense vs flap-20 vs flap-50 SmolLM2, PyTorch and ONNX Runtime.

Prefill latency of one batch of 512 tokens, median of repeats. Prefill is the first forward of
generation: every position runs through the decoder and the LM head scores the last position only
(what `generate` asks for with `logits_to_keep=1`); PyTorch also fills its KV cache, the ONNX graph
has no cache outputs. `--all-logits` scores every position instead (the LM head, 28 M of the 135 M
parameters and untouched by FLAP, then runs 512 times, which caps the 50% speed-up near 1.65x).
The models are measured in interleaved rounds (dense, 20%, 50%, dense, ...), so load from other
processes on a shared machine hits all of them alike.

    python benchmarks/flap_speed.py [--repeats 10] [--threads 2] [--seq-len 512] [--sparsity 0.2 0.5] [--all-logits]
    python benchmarks/flap_speed.py --recipes llm-prune-50 cfsp-50 nirvana-50   # any shipped recipes instead of FLAP
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slimc.compiler.calibration.sources import open_source
from slimc.compiler.frontends.loaders import load
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import PassContext
from slimc.compiler.pipeline.recipes import load_recipe
from slimc.compiler.surgery import apply_plan
from slimc.passes.flap import Flap, FlapConfig, compensate, plan_flap


def torch_runner(model: Model, ids: torch.Tensor, all_logits: bool):
    module = model.module.eval()

    def run() -> None:
        with torch.inference_mode():
            if all_logits:
                module(input_ids=ids, use_cache=False)
            else:
                module(input_ids=ids, use_cache=True, logits_to_keep=1)

    return run


def ort_runner(model: Model, ids: torch.Tensor, workdir: Path, threads: int, all_logits: bool):
    import onnxruntime as ort

    from slimc.compiler.emit.onnx_export import write_onnx

    workdir.mkdir(parents=True, exist_ok=True)
    path = write_onnx(model, workdir, logits_to_keep=0 if all_logits else 1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: ids.numpy()}

    def run() -> None:
        sess.run(None, feed)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--all-logits", action="store_true", help="score every position, not only the last")
    ap.add_argument("--round-neurons-to", type=int, default=None, help="override the recipes' MLP width rounding")
    ap.add_argument("--stats-cache", help="calibration statistics saved by benchmarks/flap.py --stats-cache")
    ap.add_argument("--recipes", nargs="*", help="time these shipped recipes' results (each compressed here) instead of FLAP's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense = load("smollm2")
    models = {"dense": dense}
    for r in args.recipes or []:
        import slimc

        t0 = time.perf_counter()
        key = Path(r).stem if r.endswith((".yaml", ".yml")) else r  # a recipe file: its name, not its path
        models[key] = slimc.compress(dense.clone(), r)
        print(f"# {key}: compressed in {time.perf_counter() - t0:.1f} s, {models[key].num_parameters():,} parameters", flush=True)
    for p in ([] if args.recipes else args.sparsity):
        m = dense.clone()
        recipe = load_recipe(f"flap-{int(round(p * 100))}") if p in (0.2, 0.3, 0.5) else None
        opts = dict(recipe.passes[0][1]) if recipe else dict(sparsity=p)
        if args.round_neurons_to is not None:
            opts["round_neurons_to"] = args.round_neurons_to
        t0 = time.perf_counter()
        if args.stats_cache and os.path.exists(args.stats_cache):
            # statistics saved by benchmarks/flap.py for the same windows: same plan, no recalibration
            cfg = FlapConfig(**opts)
            tokens = open_source(cfg.calibration).windows(dense.tokenizer, cfg.samples, cfg.seq_len, cfg.seed or 0)
            fp = plan_flap(m, tokens, cfg, torch.load(args.stats_cache, weights_only=False))
            compensate(m.module, fp.compensations)
            apply_plan(m.module, fp.plan)
        else:
            Flap(**opts)(m, PassContext())
        print(f"# flap p={p}: pruned in {time.perf_counter() - t0:.1f} s, {m.num_parameters():,} parameters", flush=True)
        models[f"flap-{int(round(p * 100))}"] = m
    ids = torch.randint(0, dense.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    runners: dict[tuple[str, str], object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in models.items():
            runners[("pytorch", name)] = torch_runner(m, ids, args.all_logits)
            if not args.no_onnx:
                runners[("onnxruntime", name)] = ort_runner(m, ids, Path(tmp) / name, args.threads, args.all_logits)
        times: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
        load_before = os.getloadavg()[0]
        for k, run in runners.items():
            for _ in range(args.warmup):
                run()
        for _ in range(args.repeats):
            for k, run in runners.items():  # interleaved rounds
                t0 = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t0)
        load_after = os.getloadavg()[0]
    print()
    scored = "every position" if args.all_logits else "the last position"
    print(f"Prefill latency, batch 1 x {args.seq_len} tokens, logits of {scored}, CPU, {args.threads} threads, median of {args.repeats} "
          f"(load average {load_before:.2f} before, {load_after:.2f} after)")
    print()
    print("| runtime | model | params | median ms | min ms | speed-up vs dense (ratio of medians) | speed-up vs dense (median of per-round ratios) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (rt, name), ts in times.items():
        med, mn = statistics.median(ts), min(ts)
        dense_ts = times[(rt, "dense")]
        # each round measures dense and this model seconds apart, so a per-round ratio cancels the slow
        # drifts of a shared machine's speed that move both medians
        per_round = statistics.median(d / t for d, t in zip(dense_ts, ts))
        print(f"| {rt} | {name} | {models[name].num_parameters():,} | {med * 1e3:.1f} | {mn * 1e3:.1f} | "
              f"{statistics.median(dense_ts) / med:.2f}x | {per_round:.2f}x |")


if __name__ == "__main__":
    main()
