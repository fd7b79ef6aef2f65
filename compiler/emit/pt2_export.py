"""torch.export emitter: OUT/model.pt2, re-loaded and compared with the in-memory model.

The exported program has the same interface as the ONNX export (`input_ids -> logits` for an
LLM, dynamic batch and sequence), so `torch.export.load(path).module()(ids)` runs it.

As for ONNX, the per-node stack traces torch.export records (absolute source paths and line
numbers of this installation) are dropped before saving: the archive depends on the model alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slimc.compiler.emit.onnx_export import _run, export_spec, float64_errors, output_diff, positional, quiet
from slimc.compiler.model import Model, first_tensor
from slimc.errors import SlimcError

PT2_NAME = "model.pt2"


def write_pt2(model: Model, out_dir: Path) -> Path:
    if model.is_onnx:
        raise SlimcError("an ONNX model cannot be written as .pt2; use --format onnx")
    module, example, dynamic, _ = export_spec(model)
    path = out_dir / PT2_NAME
    try:
        with quiet(), torch.no_grad():
            args, kwargs, shapes, _ = positional(module, example, dynamic)
            program = torch.export.export(module, args, kwargs=kwargs, dynamic_shapes=shapes, strict=False)
        drop_stack_traces(program)
        torch.export.save(program, str(path))
    except Exception as e:  # noqa: BLE001 — export failures are many types; the model is the user's
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlimcError(f"torch.export failed ({type(e).__name__}: {first}); rerun with --debug for details") from e
    return path


def drop_stack_traces(program: torch.export.ExportedProgram) -> None:
    """Remove `stack_trace` from the metadata of every node, nested graphs (control flow) included."""
    for gm in program.graph_module.modules():
        if isinstance(gm, torch.fx.GraphModule):
            for node in gm.graph.nodes:
                node.meta.pop("stack_trace", None)


def verify_pt2(model: Model, path: Path, atol: float = 1e-4) -> dict[str, Any]:
    """Load the saved program and compare its outputs with the module on other input shapes
    (beyond `atol`, judged against a float64 run as in `emit_onnx.verify_onnx`)."""
    module, example, _, more = export_spec(model)
    samples = [example, *more]
    loaded = torch.export.load(str(path)).module()
    worst, outputs = 0.0, []
    for inputs in samples:
        args, kwargs, _, _ = positional(module, inputs, {k: None for k in inputs})
        with torch.no_grad():
            got = loaded(*args, **kwargs)
        got = first_tensor(got).detach().cpu().to(torch.float64).numpy()
        ref = _run(module, inputs)
        if got.shape != ref.shape:
            raise SlimcError(f".pt2 output shape {tuple(got.shape)} differs from PyTorch {tuple(ref.shape)}")
        outputs.append(got)
        worst = max(worst, output_diff(got, ref, "the .pt2"))
    result = {"check": "torch.export.load vs module", "max_abs_diff": worst, "atol": atol, "ok": worst <= atol}
    if not result["ok"]:
        exported_err, torch_err = float64_errors(module, samples, outputs)
        bound = max(atol, 2 * torch_err)
        result["float64_check"] = {"pt2_vs_fp64": exported_err, "pytorch_fp32_vs_fp64": torch_err, "bound": bound}
        result["ok"] = exported_err <= bound
    if not result["ok"]:
        raise SlimcError(f"the exported .pt2 differs from the model by {worst:.3g} (> {atol:g}); nothing was written")
    return result
