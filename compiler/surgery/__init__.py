"""Surgery: the one mechanism that removes (`apply_plan`) or zeroes (`mask_plan`) a plan's channels.

    apply_plan(model, {group: [channels]})   # a slimc Model (PyTorch or ONNX), an nn.Module or an onnx_ir.Model
    mask_plan(model, {group: [channels]})

A plan maps `Group`s to channel indices (`surgery.plan`). Both dispatch on the front-end: PyTorch
modules are cut by `surgery.torch_module`, ONNX graphs by `surgery.onnx_model` (which also
rewrites the shape constants that encode the old widths). The contract, tested on every
architecture: after `mask_plan`, `apply_plan` leaves the model's outputs unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from slimc.compiler.groups import Group
from slimc.compiler.model import Model
from slimc.compiler.surgery import onnx_model, torch_module

Plan = Mapping[Group, Sequence[int]]


def _target(model: Any) -> tuple[str, Any]:
    if isinstance(model, Model):
        return ("onnx", model.onnx) if model.is_onnx else ("torch", model.module)
    if isinstance(model, nn.Module):
        return "torch", model
    return "onnx", model  # an onnx_ir.Model


def apply_plan(model: Model | nn.Module | Any, plan: Plan) -> dict[str, int]:
    """Remove the plan's channels in place; returns {"params_removed": n, ...}."""
    kind, target = _target(model)
    if not plan:
        return {"params_removed": 0}
    if kind == "onnx":
        return onnx_model.apply_plan_onnx(target, plan)
    return torch_module.apply_plan(target, plan)


def mask_plan(model: Model | nn.Module | Any, plan: Plan) -> None:
    """Zero, in place, every index the plan would remove."""
    kind, target = _target(model)
    if kind == "onnx":
        onnx_model.mask_plan_onnx(target, plan)
    else:
        torch_module.mask_plan(target, plan)
