"""`apply_plan` / `mask_plan` take a slimc Model of either front-end (or its module / graph) and dispatch."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from slimc.compiler.analysis.coupling import model_groups
from slimc.compiler.frontends.import_onnx import load_onnx
from slimc.compiler.model import Model
from slimc.compiler.pipeline.instruments import outputs
from slimc.compiler.surgery import apply_plan, mask_plan

from onnx_roundtrip import export_onnx, feeds_for, perturb_parameters_, run_ort


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return perturb_parameters_(nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4)).eval())


def plan_for(model: Model) -> dict:
    groups = [g for g in model_groups(model) if g.prunable and g.exact and g.size == 10]
    assert len(groups) == 1
    return {groups[0]: [1, 4, 7]}


def test_torch_model_and_module_dispatch_alike():
    x = torch.randn(3, 6)
    a = Model(module=mlp(), example_inputs={"input": x})
    b = Model(module=mlp(), example_inputs={"input": x})
    mask_plan(a, plan_for(a))
    masked = a.module(x)
    stats = apply_plan(a, plan_for(a))
    assert stats["params_removed"] == 3 * 6 + 3 + 3 * 4
    torch.testing.assert_close(a.module(x), masked, rtol=0, atol=1e-6)
    apply_plan(b.module, plan_for(b))  # the bare module takes the same surgery
    assert [p.shape for p in b.module.parameters()] == [p.shape for p in a.module.parameters()]


def test_onnx_model_dispatches_to_the_graph_surgery(tmp_path):
    x = torch.randn(3, 6)
    path = export_onnx(mlp(), (x,), tmp_path / "mlp.onnx")
    model = Model(onnx=load_onnx(path), source_format="onnx")
    feeds = feeds_for(model.onnx, (x,))
    plan = plan_for(model)
    mask_plan(model, plan)
    masked = outputs(model, feeds)
    stats = apply_plan(model, plan)
    assert stats["params_removed"] == 3 * 6 + 3 + 3 * 4
    np.testing.assert_allclose(outputs(model, feeds), masked, rtol=0, atol=1e-6)
    np.testing.assert_allclose(run_ort(model.onnx, feeds, tmp_path / "pruned.onnx")[0], masked, rtol=0, atol=1e-6)


def test_empty_plan_changes_nothing():
    m = Model(module=mlp())
    assert apply_plan(m, {}) == {"params_removed": 0}
