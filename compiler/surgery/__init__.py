"""Surgery: the one mechanism that removes (`apply_plan`) or zeroes (`mask_plan`) a plan's channels.

    apply_plan(model, {group: [channels]})   # a slimc Model (PyTorch or ONNX), an nn.Module or an onnx_ir.Model
    mask_plan(model, {group: [channels]})

A plan maps `Group`s to channel indices (`surgery.plan`). Both dispatch on the front-end: PyTorch
modules are cut by `surgery.torch_module`, ONNX graphs by `surgery.onnx_model` (which also
rewrites the shape constants that encode the old widths). The contract, tested on every
architecture: after `mask_plan`, `apply_plan` leaves the model's outputs unchanged.

The analysis can only see the widths a graph shows; a module may keep others in plain Python
attributes (`self.inner = heads * head_dim` used in a reshape) that no surgery can know to update.
So for a slimc `Model` with a PyTorch module, `apply_plan` checks the contract itself before
touching the model (`verify`, on by default): the plan is applied to a copy, which must run on the
model's example input and match the masked copy; groups whose removal breaks that are found by
bisection, left whole, and reported (`groups_refused`, with the error each caused, and a warning);
a group that is not exact by construction (an MoE expert) must only leave a model that runs.
A pass therefore never returns a model that does not run. Passes whose units a recogniser already
proves exact (the decoder-LLM passes) turn the check off to avoid copying a large model.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from slimc.compiler.groups import Group
from slimc.compiler.model import Model, first_tensor
from slimc.compiler.surgery import onnx_model, torch_module

Plan = Mapping[Group, Sequence[int]]
VERIFY_RTOL = 1e-4  # of the largest output magnitude: fp32 rounding of a different summation order


def _target(model: Any) -> tuple[str, Any]:
    if isinstance(model, Model):
        return ("onnx", model.onnx) if model.is_onnx else ("torch", model.module)
    if isinstance(model, nn.Module):
        return "torch", model
    return "onnx", model  # an onnx_ir.Model


def apply_plan(model: Model | nn.Module | Any, plan: Plan, *, verify: bool = True) -> dict[str, Any]:
    """Remove the plan's channels in place; returns {"params_removed": n, ...}.

    With `verify` and a slimc Model whose PyTorch module has example inputs (its own, or probe ids
    for a causal LM), groups whose removal would break the model are left whole and listed under
    `groups_refused` (see the module docstring).
    """
    kind, target = _target(model)
    if not plan:
        return {"params_removed": 0}
    if kind == "onnx":
        return onnx_model.apply_plan_onnx(target, plan)
    inputs = _example_inputs(model) if verify and isinstance(model, Model) else None
    if inputs is None:
        return torch_module.apply_plan(target, plan)
    refused = _refused_groups(target, plan, inputs)
    kept = {g: v for g, v in plan.items() if g not in refused}
    stats: dict[str, Any] = torch_module.apply_plan(target, kept) if kept else {"params_removed": 0}
    if refused:
        stats["groups_refused"] = [{"group": g.name, "reason": why} for g, why in refused.items()]
        names = ", ".join(g.name for g in list(refused)[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
        warnings.warn(f"{len(refused)} group(s) left whole because removing their channels breaks the model "
                      f"({names}: {next(iter(refused.values()))})", stacklevel=2)
    return stats


def _example_inputs(model: Model) -> dict[str, Any] | None:
    if model.example_inputs:
        return dict(model.example_inputs)
    if model.is_causal_lm:
        return {"input_ids": model.probe_ids()}
    return None


def _run(module: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return first_tensor(module(**inputs)).detach().float()


def _copy(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # copying a loaded torch.export program warns about torch internals
        warnings.filterwarnings("ignore", category=FutureWarning)
        return copy.deepcopy(module)


def _failure(module: nn.Module, plan: Plan, inputs: dict[str, Any]) -> str | None:
    """Why applying `plan` to a copy of `module` breaks the surgery contract, or None when it holds.

    Groups marked exact must reproduce the masked model; removing one that is not (an MoE expert: the
    router's softmax renormalises over the experts left) must still give a model that runs."""
    masked = _copy(module)
    torch_module.mask_plan(masked, plan)
    ref = _run(masked, inputs)
    del masked
    pruned = _copy(module)
    try:
        torch_module.apply_plan(pruned, plan)
        got = _run(pruned, inputs)
    except Exception as e:  # noqa: BLE001 — whatever the cut module raises is the reason it is refused
        text = " ".join(str(e).split())
        return f"{type(e).__name__}: {text[:200]}"
    if got.shape != ref.shape:
        return f"the output shape changes from {tuple(ref.shape)} to {tuple(got.shape)}"
    if not all(getattr(g, "exact", True) for g in plan):
        return None
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    if not diff <= VERIFY_RTOL * scale:
        return f"the output differs from the masked model's by {diff:.3g}"
    return None


def _refused_groups(module: nn.Module, plan: Plan, inputs: dict[str, Any]) -> dict[Group, str]:
    """The groups of `plan` whose removal breaks the module, found by bisection (few copies when all is well)."""
    try:
        _run(module, inputs)
    except Exception:  # noqa: BLE001 — the module does not run on these inputs at all: nothing to check against
        return {}
    refused: dict[Group, str] = {}

    def find(base: list[Group], candidates: list[Group], why: str | None = None) -> None:
        """Refuse the candidates that break the module on top of `base`; `why`: their failure, when already known."""
        if why is None:
            why = _failure(module, {g: plan[g] for g in base + candidates}, inputs)
        if why is None:
            return
        if len(candidates) == 1:
            refused[candidates[0]] = why
            return
        half = len(candidates) // 2
        left, right = candidates[:half], candidates[half:]
        find(base, left)
        find(base + [g for g in left if g not in refused], right)

    while True:
        remaining = [g for g in plan if g not in refused]
        why = _failure(module, {g: plan[g] for g in remaining}, inputs) if remaining else None
        if why is None:
            return refused
        found = len(refused)
        find([], remaining, why)
        if len(refused) == found:  # every part passes alone, only their combination fails: keep them all
            refused.update({g: why for g in remaining})
            return refused


def mask_plan(model: Model | nn.Module | Any, plan: Plan) -> None:
    """Zero, in place, every index the plan would remove."""
    kind, target = _target(model)
    if kind == "onnx":
        onnx_model.mask_plan_onnx(target, plan)
    else:
        torch_module.mask_plan(target, plan)
