"""End-to-end 2:4 decode speed: tokens per second of a Llama-7B-shaped model, 2:4 vs dense.

Random weights (speed does not depend on them): every decoder projection (q, k, v, o, gate, up, down)
gets a magnitude 2:4 mask and becomes a `SparseLinear` (slimc-nm packed), which dispatches to our
decode kernel where it measures faster than cuBLAS (runtime/sparse_linear.py); embeddings and the LM
head stay dense. Greedy decoding of --new-tokens tokens after a --prompt-tokens prompt, batch 1,
HF's KV cache; tokens per second over the decode steps only (the prefill is timed apart), median of
--repeats, both models in interleaved rounds.

    python benchmarks/sparse24_decode_e2e.py                     # on a CUDA machine, fp16
    python benchmarks/sparse24_decode_e2e.py --shape tiny --device cpu --dtype float32 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from flap_gpu_speed import SHAPES, random_llama

from slimc.compiler.analysis.llm import decoder_layers
from slimc.passes._nm_math import magnitude_scores, nm_mask_from_scores
from slimc.runtime.sparse_linear import to_sparse

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def make_24(model) -> int:
    """Mask every decoder projection 2:4 by magnitude and pack it; returns the layers swapped."""
    names = []
    for v in decoder_layers(model):
        for proj in PROJECTIONS:
            path = f"{v.prefix}.{proj}"
            lin = model.module.get_submodule(path)
            with torch.no_grad():
                lin.weight.mul_(nm_mask_from_scores(magnitude_scores(lin.weight), 2, 4).to(lin.weight.dtype))
            names.append(path)
    return len(to_sparse(model.module, names, 2, 4))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_seconds(module, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """(prefill seconds, seconds for `new_tokens` greedy steps after it)."""
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = module(input_ids=prompt, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        sync(device)
        t1 = time.perf_counter()
        cache = out.past_key_values
        for _ in range(new_tokens):
            out = module(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        sync(device)
        return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dense = random_llama(args.shape, dtype)
    sparse = dense.clone()
    swapped = make_24(sparse)
    models = {"dense": dense, "2:4": sparse}
    for m in models.values():
        m.module.to(device)
    prompt = torch.randint(0, dense.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    for m in models.values():  # warm-up: kernel build, the dispatcher's per-shape timing, allocator
        decode_seconds(m.module, prompt, 4, device)
    times = {n: [] for n in models}
    for _ in range(args.repeats):
        for n, m in models.items():
            times[n].append(decode_seconds(m.module, prompt, args.new_tokens, device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{args.shape} with random weights, {args.dtype}, {name}; {swapped} projections 2:4; batch 1, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.repeats}\n")
    print("| model | prefill ms | decode tokens/s | speed-up vs dense |")
    print("| --- | --- | --- | --- |")
    base = statistics.median(args.new_tokens / d for _, d in times["dense"])
    for n, ts in times.items():
        tps = statistics.median(args.new_tokens / d for _, d in ts)
        print(f"| {n} | {statistics.median(p for p, _ in ts) * 1e3:.1f} | {tps:.1f} | {tps / base:.2f}x |")


if __name__ == "__main__":
    main()
