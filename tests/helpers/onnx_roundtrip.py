"""The ONNX front-end's exactness check: export, import, group, mask, run ORT, remove, run ORT.

    case = onnx_roundtrip_case(module, (x,), tmp_path)     # groups from compiler.analysis.coupling.find_groups
    case.exact, case.max_diff, case.groups, case.prunable

`onnx_roundtrip_case` is what tests and the zoo benchmark use to answer "does the ONNX front-end
prune this model exactly": channels of every prunable group are zeroed (`mask_plan_onnx`), ONNX
Runtime runs the masked model, the same channels are removed (`apply_plan_onnx`), the pruned file
is checked by `onnx.checker` and run again; the outputs must agree to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from slimc.compiler.frontends.import_onnx import import_onnx, load_onnx
from slimc.compiler.groups import Group
from slimc.compiler.surgery.onnx_model import apply_plan_onnx, mask_plan_onnx
from slimc.errors import SlimcError


def export_onnx(module: nn.Module, example_inputs: tuple, path: str | Path, *, opset: int = 18,
                optimize: bool = True, dynamic_shapes: Any = None) -> Path:
    """`torch.onnx.export(dynamo=True)` with the exporter's chatter silenced."""
    import contextlib
    import io
    import warnings

    path = Path(path)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example_inputs, str(path), dynamo=True, opset_version=opset,
                          optimize=optimize, dynamic_shapes=dynamic_shapes, verbose=False)
    return path


def perturb_parameters_(module: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Give every parameter and float buffer distinct random values (in place).

    The exporter's optimiser merges identical initializers and drops zero biases; a test model with
    fresh ones/zeros would then not have one initializer per parameter.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            if "running_var" in name:
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.dim() <= 1:
                t.add_(torch.randn(t.shape, generator=gen) * 0.1)
            else:
                t.mul_(1.0 + scale * torch.randn(t.shape, generator=gen).clamp(-1, 1))
    return module


def save_onnx(model: ir.Model, path: str | Path) -> Path:
    """Save with every initializer written beside the file (`<name>.data`).

    A model loaded from an export keeps lazy references to the exporter's external data file; a
    save elsewhere must copy those tensors, not the references.
    """
    path = Path(path)
    ir.save(model, str(path), external_data=f"{path.name}.data")
    return path


def run_ort(model: ir.Model | str | Path, feeds: dict[str, np.ndarray], path: str | Path | None = None) -> list[np.ndarray]:
    """Run a model on ONNX Runtime's CPU provider (an in-memory model is saved to `path` first)."""
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        if path is None:
            raise ValueError("run_ort needs a path to save an in-memory model to")
        model = save_onnx(model, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def feeds_for(model: ir.Model, example_inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    return {v.name: t.detach().cpu().numpy() for v, t in zip(model.graph.inputs, tensors)}


def random_plan(groups: Sequence[Group], fraction: float = 0.25, seed: int = 0) -> dict[Group, list[int]]:
    """Remove `fraction` of each prunable group's channels (at least one, never all)."""
    rng = np.random.default_rng(seed)
    plan: dict[Group, list[int]] = {}
    for g in groups:
        if not g.prunable or not getattr(g, "exact", True) or g.size < 2:
            continue
        k = min(g.size - 1, max(1, math.floor(fraction * g.size)))
        plan[g] = sorted(int(c) for c in rng.choice(g.size, size=k, replace=False))
    return plan


@dataclass
class RoundtripCase:
    groups: int = 0
    prunable: int = 0
    prunable_fraction: float = 0.0  # share of float weights in tensors some prunable group cuts
    exact: bool = False
    max_diff: float = float("nan")
    params_before: int = 0
    params_removed: int = 0
    error: str = ""
    groups_checked: int = 0  # prunable exact groups checked one at a time (per_group=True)
    groups_exact: int = 0
    group_errors: list[str] = field(default_factory=list)
    plan: dict = field(default_factory=dict, repr=False)


def _float_numel(model: ir.Model) -> dict[str, int]:
    return {n: int(v.const_value.size) for n, v in model.graph.initializers.items()
            if v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point()}


def onnx_roundtrip_case(module: nn.Module, example_inputs: tuple, tmp_path: str | Path, *,
                        find_groups: Callable[..., list[Group]] | None = None, fraction: float = 0.25,
                        seed: int = 0, rtol: float = 1e-5, optimize: bool = True,
                        per_group: bool = False) -> RoundtripCase:
    """Export `module`, group its ONNX graph, prune `fraction` of every prunable group, check exactness.

    With `per_group`, each group is also checked on its own (a fresh copy of the model per group),
    so a table can say how many groups are exact when the all-at-once plan is not.
    """
    tmp = Path(tmp_path)
    tmp.mkdir(parents=True, exist_ok=True)
    case = RoundtripCase()
    src = export_onnx(module, example_inputs, tmp / "model.onnx", optimize=optimize)
    model = load_onnx(src)
    if find_groups is None:
        from slimc.compiler.analysis.coupling import find_groups as _find  # the coupled-dimension analysis
        find_groups = _find
    try:
        groups = find_groups(import_onnx(model))
    except SlimcError as e:
        case.error = f"grouping: {e}"
        return case
    sizes = _float_numel(model)
    case.params_before = sum(sizes.values())
    case.groups = len(groups)
    prunable = [g for g in groups if g.prunable]
    case.prunable = len(prunable)
    touched = {s.param for g in prunable for s in g.slices}
    case.prunable_fraction = sum(sizes.get(p, 0) for p in touched) / max(1, case.params_before)
    plan = random_plan(prunable, fraction, seed)
    case.plan = plan
    if not plan:
        case.error = "no prunable group"
        return case
    feeds = feeds_for(model, example_inputs)
    if per_group:
        for g, chans in plan.items():
            single = load_onnx(src)
            case.groups_checked += 1
            ok, diff, _, err = check_plan(single, {g: chans}, feeds, tmp / "group", rtol)
            case.groups_exact += int(ok)
            if not ok:
                case.group_errors.append(f"{g.name}: {err or f'max diff {diff:.3g}'}")
    ok, diff, stats, err = check_plan(model, plan, feeds, tmp, rtol)
    case.exact, case.max_diff, case.error = ok, diff, err
    case.params_removed = stats.get("params_removed", 0)
    return case


def check_plan(model: ir.Model, plan: dict, feeds: dict[str, np.ndarray], tmp: Path,
               rtol: float = 1e-5) -> tuple[bool, float, dict, str]:
    """mask -> ORT -> remove -> onnx.checker -> ORT: (exact, max diff, surgery stats, error)."""
    import onnx

    tmp.mkdir(parents=True, exist_ok=True)
    try:
        mask_plan_onnx(model, plan)
        y0 = run_ort(model, feeds, tmp / "masked.onnx")
        stats = apply_plan_onnx(model, plan)
        save_onnx(model, tmp / "pruned.onnx")
        onnx.checker.check_model(str(tmp / "pruned.onnx"), full_check=True)
        y1 = run_ort(tmp / "pruned.onnx", feeds)
    except Exception as e:  # noqa: BLE001 — a benchmark row reports the failure instead of stopping
        return False, float("nan"), {}, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    diff = max(float(np.abs(a - b).max()) for a, b in zip(y0, y1))
    scale = max(1.0, max(float(np.abs(a).max()) for a in y0))
    return diff <= rtol * scale, diff, stats, ""
