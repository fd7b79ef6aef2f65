"""Instruments: code the pass manager calls around every pass, switched on by settings.

An instrument is a callable `(event, pass_name, model)` with event "start" (before the pass) or
"end" (after it, once its record is in `model.history`). `PassContext(check_passes=True)`
(`compress --check-passes`) adds `OutputProbe`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slimc.compiler.model import Model
from slimc.errors import PostconditionError


class OutputProbe:
    """After each pass: the model still runs on one fixed probe input, its outputs are finite, and
    how far they moved, as the max abs difference from the previous pass's outputs and from the
    input model's (None where the output shape changed). Written to `record.checks["probe"]`.

    The probe is `Model.probe_ids()` for a language model, `Model.example_inputs` for other
    PyTorch models, and random feeds of the graph's input shapes (dynamic axes of size 2) for an
    ONNX model run in ONNX Runtime. A non-finite output raises `PostconditionError`.
    """

    def __init__(self) -> None:
        self.inputs: Any = None
        self.first: np.ndarray | None = None
        self.previous: np.ndarray | None = None

    def __call__(self, event: str, pass_name: str, model: Model) -> None:
        if event == "start" and self.first is None:
            self.inputs = probe_inputs(model)
            self.first = self.previous = outputs(model, self.inputs)
        elif event == "end":
            out = outputs(model, self.inputs)
            finite = bool(np.isfinite(out).all())
            model.history[-1].checks["probe"] = {
                "finite": finite,
                "max_abs_drift_from_previous": _drift(out, self.previous),
                "max_abs_drift_from_input": _drift(out, self.first),
            }
            if not finite:
                raise PostconditionError(f"after pass '{pass_name}' the model's outputs on the probe input are not finite")
            self.previous = out


def _drift(a: np.ndarray, b: np.ndarray | None) -> float | None:
    if b is None or a.shape != b.shape:
        return None
    return float(np.abs(a - b).max()) if a.size else 0.0


def probe_inputs(model: Model) -> dict[str, Any]:
    if model.is_onnx:
        return _onnx_feeds(model.onnx)
    if model.is_causal_lm:
        return {"input_ids": model.probe_ids()}
    if not model.example_inputs:
        raise PostconditionError("check_passes needs a probe input: a causal LM, an ONNX model, or Model.example_inputs")
    return dict(model.example_inputs)


@torch.no_grad()
def outputs(model: Model, inputs: dict[str, Any]) -> np.ndarray:
    """The model's first output on `inputs`, in float64."""
    if model.is_onnx:
        return _run_onnx(model.onnx, inputs)
    module = model.module
    was_training = module.training
    module.eval()
    device = next(iter(module.parameters()), torch.empty(0)).device
    try:
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if model.is_causal_lm:
            kwargs["use_cache"] = False
        out = module(**kwargs)
    finally:
        module.train(was_training)
    out = getattr(out, "logits", out)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.detach().float().cpu().double().numpy()


_NP_DTYPES = {"FLOAT": np.float32, "FLOAT16": np.float16, "DOUBLE": np.float64, "INT64": np.int64, "INT32": np.int32,
              "BOOL": np.bool_}


def _onnx_feeds(model: Any) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for v in model.graph.inputs:
        shape = [d if isinstance(d, int) else 2 for d in (v.shape.dims if v.shape is not None else ())]
        dtype = _NP_DTYPES.get(v.dtype.name if v.dtype is not None else "FLOAT", np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
        else:  # ids and indices: 0 and 1 are valid for any embedding or gather
            feeds[v.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def _run_onnx(model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run an onnx_ir model in ONNX Runtime. It is saved to a temporary directory first, its
    initializers beside it: a model loaded from a file keeps references to that file's external data."""
    import tempfile
    from pathlib import Path

    import onnx_ir
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="slimc-probe-") as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx_ir.save(model, str(path), external_data="probe.onnx.data")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, feeds)[0], dtype=np.float64)
