"""FLAP speed on a GPU: a Llama-2-7B-shaped model with random weights, dense vs FLAP at 20% and 50%.

No download: the model is built from a Llama-2-7B config (hidden 4096, 32 layers, 32 heads, MHA,
MLP 11008, vocab 32000) with random weights. Widths come from the real FLAP planner
(`plan_flap`, WIFV, AL-AM) run on synthetic channel statistics (random per-channel variance and
mean, seed 0) instead of a calibration pass: on random weights there is nothing for calibration to
find, and the speed depends only on the widths. Planning and surgery run on the CPU in the timing
dtype (fp16 unless --dtype); the models are then timed on the device in interleaved rounds:

  prefill  batch 1 x 512 tokens, KV cache filled, logits of the last position
  decode   batch 1, 1 new token after a 512-token KV cache (the step a chat model repeats)

Medians of CUDA-event timings. Host and device memory: the three models, about 31 GB in fp16.

    python benchmarks/flap_gpu_speed.py                       # on a CUDA machine
    python benchmarks/flap_gpu_speed.py --shape tiny --device cpu --repeats 2   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from slimc.compiler.calibration.stats import InputStats
from slimc.compiler.model import Model
from slimc.compiler.surgery import apply_plan
from slimc.passes.flap import FlapConfig, compensate, flap_targets, plan_flap
from slimc.runtime.sparse_linear import cuda_median_ms

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}


def random_llama(shape: str, dtype: torch.dtype) -> Model:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        module = LlamaForCausalLM(cfg)
    module = module.to(dtype).to_empty(device="cpu")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        module.model.rotary_emb.__init__(cfg)  # rebuild its buffers after to_empty
    return Model(module=module.eval(), config=cfg, tokenizer=None, source_format="random")


def synthetic_stats(model: Model, seed: int = 0) -> dict[str, InputStats]:
    """Per-channel input statistics with a log-normal spread of variances, as real activations show."""
    g = torch.Generator().manual_seed(seed)
    stats = {}
    count = 1024
    for path in flap_targets(model):
        d = model.module.get_submodule(path).weight.shape[1]
        var = torch.exp(torch.randn(d, generator=g, dtype=torch.float64))
        mean = 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
        stats[path] = InputStats(count, mean, var, (var + mean * mean) * count)
    return stats


def pruned(dense: Model, sparsity: float, stats: dict[str, InputStats]) -> Model:
    m = dense.clone()
    tokens = torch.zeros(1, 2, dtype=torch.long)  # unused: the statistics are given
    fp = plan_flap(m, tokens, FlapConfig(sparsity=sparsity, round_neurons_to=8), stats)
    compensate(m.module, fp.compensations)
    apply_plan(m.module, fp.plan)
    return m


def time_ms(fn, device: torch.device) -> float:
    """One timed call of `fn`: CUDA events on a GPU, wall clock on the CPU."""
    if device.type == "cuda":
        return cuda_median_ms(fn, 1, warmup=0)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def runners(module: torch.nn.Module, ids: torch.Tensor) -> dict[str, object]:
    def prefill() -> None:
        with torch.inference_mode():
            module(input_ids=ids, use_cache=True, logits_to_keep=1)

    with torch.inference_mode():
        cache = module(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    nxt = ids[:, -1:]
    pos = torch.tensor([[ids.shape[1]]], device=ids.device)

    def decode() -> None:
        with torch.inference_mode():
            module(input_ids=nxt, past_key_values=cache, position_ids=pos, use_cache=True)
            cache.crop(-1)  # back to the prompt's cached tokens for the next round

    return {"prefill": prefill, "decode": decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0 = time.perf_counter()
    dense = random_llama(args.shape, dtype)
    stats = synthetic_stats(dense)
    models = {"dense": dense}
    for p in args.sparsity:
        models[f"flap-{int(round(p * 100))}"] = pruned(dense, p, stats)
    print(f"# built and pruned in {time.perf_counter() - t0:.1f} s", flush=True)
    ids = torch.randint(0, dense.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    params = {n: m.num_parameters() for n, m in models.items()}
    runs = {}
    for name, m in models.items():
        m.module.to(device)  # already in the timing dtype
        for kind, fn in runners(m.module, ids).items():
            runs[(kind, name)] = fn
    for fn in runs.values():  # warm-up (kernel selection, allocator)
        fn()
        fn()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():  # interleaved rounds
            times[k].append(time_ms(fn, device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{args.shape} with random weights, {args.dtype}, {name}, median of {args.repeats}\n")
    print("| step | model | params | median ms | speed-up vs dense |")
    print("| --- | --- | --- | --- | --- |")
    for (kind, model), ts in times.items():
        med = statistics.median(ts)
        base = statistics.median(times[(kind, "dense")])
        print(f"| {kind} ({'1 x ' + str(args.seq_len) if kind == 'prefill' else '1 token after ' + str(args.seq_len)}) | {model} | {params[model]:,} | {med:.2f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
