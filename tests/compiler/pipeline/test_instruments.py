"""OutputProbe on an ONNX model: the pruned graph still runs in ONNX Runtime and its drift is recorded."""

from __future__ import annotations

import torch
from torch import nn

from slimc.compiler.frontends.import_onnx import load_onnx
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import PassContext, PassManager
from slimc.compiler.pipeline.recipes import load_recipe

from onnx_roundtrip import export_onnx, perturb_parameters_


def test_probe_runs_an_onnx_model_after_each_pass(tmp_path):
    torch.manual_seed(0)
    net = perturb_parameters_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval())
    path = export_onnx(net, (torch.randn(1, 3, 9, 9),), tmp_path / "net.onnx")
    model = Model(onnx=load_onnx(path), source_format="onnx")
    passes = load_recipe("identity").build() + load_recipe("group-magnitude-25").build()
    out = PassManager(passes).run(model, PassContext(check_passes=True))
    ident, pruned = (r.checks["probe"] for r in out.history)
    assert ident == {"finite": True, "max_abs_drift_from_previous": 0.0, "max_abs_drift_from_input": 0.0}
    assert out.history[1].stats["channels_removed"] == 2  # 2 of the 8 inner channels
    assert pruned["finite"] and pruned["max_abs_drift_from_previous"] > 0  # lossy, and the probe saw it
