"""torch.export emitter: OUT/model.pt2, re-loaded and compared with the in-memory model.

The exported program has the same interface as the ONNX export (`input_ids -> logits` for an
LLM, dynamic batch and sequence), so `torch.export.load(path).module()(ids)` runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .emit_onnx import export_spec, positional, quiet
from .errors import SlimcError
from .model import Model

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
        torch.export.save(program, str(path))
    except Exception as e:  # noqa: BLE001 — export failures are many types; the model is the user's
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlimcError(f"torch.export failed ({type(e).__name__}: {first}); rerun with --debug for details") from e
    return path


def verify_pt2(model: Model, path: Path, atol: float = 1e-4) -> dict[str, Any]:
    """Load the saved program and compare its outputs with the module on other input shapes."""
    module, example, _, more = export_spec(model)
    loaded = torch.export.load(str(path)).module()
    worst = 0.0
    for inputs in [example, *more]:
        with torch.no_grad():
            args, kwargs, _, _ = positional(module, inputs, {k: None for k in inputs})
            ref, got = module(*args, **kwargs), loaded(*args, **kwargs)
        ref = ref[0] if isinstance(ref, (tuple, list)) else ref
        got = got[0] if isinstance(got, (tuple, list)) else got
        if got.shape != ref.shape:
            raise SlimcError(f".pt2 output shape {tuple(got.shape)} differs from PyTorch {tuple(ref.shape)}")
        worst = max(worst, float((got.float() - ref.float()).abs().max()) if ref.numel() else 0.0)
    result = {"check": "torch.export.load vs module", "max_abs_diff": worst, "atol": atol, "ok": worst <= atol}
    if not result["ok"]:
        raise SlimcError(f"the exported .pt2 differs from the model by {worst:.3g} (> {atol:g}); nothing was written")
    return result
