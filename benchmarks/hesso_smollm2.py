"""HESSO from a pretrained start: SmolLM2-135M-Instruct fine-tuned with HESSO on pydoc calibration windows
to 20% fewer attention + MLP weights, next to flap-20 and flap-lsq-20 at the same parameter count.

Protocol: float32 on the CPU; training data = `samples` windows of `seq_len` tokens of the pydoc
calibration half (seed 0); candidate groups = attention KV groups and MLP neurons (embeddings and the
residual width untouched); budget = parameters, `sparsity` of what those groups can cut (the
attention and MLP weights), as FLAP's p counts; AdamW with a cosine schedule; `steps` steps;
HESSO's periods over the first half of them. Evaluation = perplexity on 16 x 512 tokens of the
held-out pydoc half (BENCHMARKS.md's FLAP protocol). FLAP rows run the shipped recipes on the same
model in the same run. This is a measurement, not a pass/fail bar.

    python benchmarks/hesso_smollm2.py                       # 200 steps, batch 4 x 128 tokens
    python benchmarks/hesso_smollm2.py --steps 400 --lr 5e-5 --no-flap
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from slimc import api
from slimc.compiler.calibration.evaluation import heldout_tokens, perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--periods", type=int, default=10)
    ap.add_argument("--no-flap", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("hesso_smollm2.json"))
    args = ap.parse_args()
    rows = []

    def ppl(model) -> float:
        return perplexity(model, heldout_tokens(model.tokenizer), seq_len=512, max_windows=16)

    dense = api.load("smollm2")
    rows.append({"method": "dense", "params": dense.num_parameters(), "ppl": ppl(dense)})
    if not args.no_flap:
        for recipe in ("flap-20", "flap-lsq-20"):
            t0 = time.perf_counter()
            m = api.compress(api.load("smollm2"), recipe)
            rows.append({"method": recipe, "params": m.num_parameters(), "ppl": ppl(m), "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
    t0 = time.perf_counter()
    overrides = [f"hesso.sparsity={args.sparsity}", "hesso.budget=params", "hesso.scope=groups",
                 "hesso.roles=[attention.kv_group, mlp.neuron]", f"hesso.lr={args.lr}", "hesso.start=0.0", "hesso.span=0.5",
                 f"hesso.periods={args.periods}", f"hesso.batch_size={args.batch_size}", f"hesso.seq_len={args.seq_len}",
                 f"hesso.samples={args.samples}", "hesso.weight_decay=0.0", "hesso.eval_points=4"]
    m = api.compress(api.load("smollm2"), "hesso-50", overrides=overrides, data="pydoc", steps=args.steps)
    st = m.history[-1].stats
    rows.append({"method": f"hesso ({args.steps} steps)", "params": m.num_parameters(), "ppl": ppl(m),
                 "ppl_trained": st.get("perplexity_trained"), "seconds": time.perf_counter() - t0,
                 "train_seconds": st["train_seconds"], "steps": st["steps"], "cost_kept": st["cost_kept"]})
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows,
                                    "curve": st["training_curve"]}, indent=2) + "\n")
    print("\n| method | params | PPL (16x512 pydoc eval) | wall s |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['params']:,} | {r['ppl']:.2f} | {r.get('seconds', 0):.0f} |")


if __name__ == "__main__":
    main()
