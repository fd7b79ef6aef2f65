"""ONNX emitter: torch.onnx.export (dynamo, opset >= 18, dynamic batch and sequence) + ORT parity.

An LLM is exported as `input_ids [batch, sequence] -> logits [batch, sequence, vocab]` (no KV cache).
Other torch models are exported from `model.example_inputs` with a dynamic batch axis. After export
ONNX Runtime runs the file on sample inputs of shapes other than the traced one, and the largest
absolute / relative difference from PyTorch goes into the report; beyond tolerance (1e-3 absolute
for LLM logits) the emission fails and nothing is written.

Weights travel with the file: inline in model.onnx while the model stays under protobuf's 2 GB,
else as external data in `model.onnx.data` beside it (a relative location inside OUT). An ONNX
input whose initializers live in its own external data file (what `torch.onnx.export` writes for
every tensor of 1 KB or more) is read from there and written out again, never referenced.

The file depends on the model alone: torch.onnx's per-node stack traces (absolute paths of the
installed torch, transformers and slimc sources, with line numbers) are dropped before saving, so
the same model exported from another checkout, or after an unrelated edit to a source file, gives
the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimc.compiler.frontends.import_torch import exported_call_form
from slimc.compiler.model import Model, first_tensor
from slimc.errors import SlimcError

OPSET = 18
LLM_ATOL = 1e-3
# fp32 rounding allowances of the float64 check in verify_onnx
FP32_NOISE_FACTOR = 4.0
FP32_NOISE_REL = 1e-4
ONNX_NAME = "model.onnx"
PROTOBUF_LIMIT = 2**31  # a serialised ModelProto, and so an ONNX file with its weights inline, stays below 2 GB
GRAPH_ALLOWANCE = 2**26  # room left under PROTOBUF_LIMIT for the nodes, names and metadata beside the weights
# node metadata that records where in the Python sources a node was traced (file paths, line numbers)
SOURCE_LOCATION_KEYS = ("pkg.torch.onnx.stack_trace",)


class CausalLMLogits(nn.Module):
    """`input_ids -> logits` without a KV cache: the graph ONNX and torch.export see.

    `logits_to_keep=1` gives a prefill graph: logits of the last position only, so the LM head
    runs once instead of once per token (what `generate` asks of the first forward)."""

    def __init__(self, module: nn.Module, logits_to_keep: int = 0):
        super().__init__()
        self.lm = module
        self.logits_to_keep = logits_to_keep

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.logits_to_keep:
            return self.lm(input_ids=input_ids, use_cache=False, logits_to_keep=self.logits_to_keep).logits
        return self.lm(input_ids=input_ids, use_cache=False).logits


def export_spec(model: Model, logits_to_keep: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any], list[dict[str, torch.Tensor]]]:
    """(module to export, example kwargs, dynamic shapes, further sample inputs for parity)."""
    if model.module is None:
        raise SlimcError("this model has no PyTorch module to export")
    if model.is_causal_lm:
        vocab = int(model.config.vocab_size)
        g = torch.Generator().manual_seed(0)
        ids = lambda b, s: {"input_ids": torch.randint(0, vocab, (b, s), generator=g)}  # noqa: E731
        batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("sequence", min=2, max=_max_len(model))
        return CausalLMLogits(model.module, logits_to_keep).eval(), ids(2, 8), {"input_ids": {0: batch, 1: seq}}, [ids(1, 13), ids(3, 5)]
    if not model.example_inputs:
        raise SlimcError("export needs example inputs for a model that is not a causal LM (Model.example_inputs)")
    example = {k: v for k, v in model.example_inputs.items()}
    dynamic = {k: ({0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() > 0 else None) for k, v in example.items()}
    module = model.module.eval()
    doubled = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in example.items()}
    try:
        _run(module, doubled)
    except Exception:  # noqa: BLE001 — the module takes only its example batch (e.g. a .pt2 exported static)
        return module, example, dynamic, []
    # torch.export specialises a dimension whose example size is 1 ("0/1 specialisation"), so a batch of one
    # would give a program that takes only batches of one: export with the doubled batch, check both
    return module, doubled, dynamic, [example]


def positional(module: nn.Module, example: dict[str, Any], dynamic: dict[str, Any]) -> tuple[tuple, dict, Any, list[str]]:
    """(args, kwargs, dynamic_shapes, input names in call order): inputs that are the leading parameters of forward go positionally,
    so the exported program is called like the module (`program(x)`, not `program(input=x)`). A module that is itself an
    exported program (a loaded .pt2) takes them in the form it was exported with, which torch.export insists on."""
    import inspect

    names = list(inspect.signature(module.forward).parameters)
    form = exported_call_form(module, (), dict(example))
    if form is not None:
        args, kwargs = form
        order = [n for n in names if n in example]
        return args, kwargs, {n: dynamic[n] for n in order}, order
    if names[: len(example)] == list(example) or sorted(names[: len(example)]) == sorted(example):
        order = names[: len(example)]
        return tuple(example[n] for n in order), {}, tuple(dynamic[n] for n in order), order
    return (), dict(example), dict(dynamic), list(example)


def _max_len(model: Model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 4096)


@contextlib.contextmanager
def quiet():
    """torch.onnx prints progress and warnings per step; the CLI shows its own progress."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def write_onnx(model: Model, out_dir: Path, logits_to_keep: int = 0) -> Path:
    """Export to out_dir/model.onnx (weights beside it, in model.onnx.data, when over protobuf's 2 GB).

    `logits_to_keep` (causal LMs): 0 = logits for every position; k = only the last k (prefill)."""
    path = out_dir / ONNX_NAME
    if model.is_onnx:
        save_onnx_model(model.onnx, path)
        return path
    module, example, dynamic, _ = export_spec(model, logits_to_keep)
    try:
        with quiet(), torch.no_grad():
            args, kwargs, shapes, names = positional(module, example, dynamic)
            program = torch.onnx.export(
                module, args, kwargs=kwargs, dynamo=True, opset_version=OPSET, dynamic_shapes=shapes,
                input_names=names, output_names=["logits"] if model.is_causal_lm else None,
                verbose=False, report=False,
            )
            drop_source_locations(program.model)
            save_onnx_model(program.model, path)
    except SlimcError:
        raise
    except Exception as e:  # noqa: BLE001 — exporter failures are many types; the model is the user's
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlimcError(f"ONNX export failed ({type(e).__name__}: {first}); rerun with --debug for details") from e
    return path


def data_name(path: Path) -> str:
    """Where `save_onnx_model` puts the weights of a model too large to be inline: beside it, relative."""
    return f"{path.name}.data"


def initializer_bytes(model: Any) -> int:
    """Bytes of every initializer of an onnx_ir model (main graph and subgraphs), read from the tensor
    headers: external tensors are not loaded."""
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value is not None)


def save_onnx_model(model: Any, path: Path) -> list[str]:
    """Write an onnx_ir model to `path` with all its weights; returns the data files written beside it.

    Under protobuf's limit every initializer is written inline, external ones (a lazily read
    reference into the input's own data file) included; above it, or when the inline message turns
    out too large, initializers go to `<name>.data` beside `path`. Either way the written model
    references nothing outside its directory. `model` is left as it was: its initializers keep
    pointing at the input's data, so the model can be written again elsewhere.
    """
    import onnx_ir

    if initializer_bytes(model) <= PROTOBUF_LIMIT - GRAPH_ALLOWANCE:
        try:
            _save_inline(model, path)
            return []
        except ValueError as e:  # protobuf refuses a message over 2 GB (many nodes beside large weights)
            if "2GB" not in str(e).replace(" ", "") and "protobuf" not in str(e).lower():
                raise
            path.unlink(missing_ok=True)
    onnx_ir.save(model, str(path), external_data=data_name(path))
    return [data_name(path)]


def _save_inline(model: Any, path: Path) -> None:
    """onnx_ir.save with every external initializer read into memory for the duration of the save."""
    import onnx_ir

    swapped: list[tuple[Any, Any]] = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, onnx_ir.ExternalTensor):
                    swapped.append((value, tensor))
                    value.const_value = onnx_ir.Tensor(tensor.numpy().copy(), name=tensor.name, dtype=tensor.dtype,
                                                       doc_string=tensor.doc_string, metadata_props=dict(tensor.metadata_props))
        onnx_ir.save(model, str(path))
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def drop_source_locations(model: Any) -> None:
    """Remove the source-location metadata of every node of an onnx_ir model (main graph, its
    subgraphs and local functions): it names files of this installation, not the model."""
    import onnx_ir

    for graph in [model.graph, *model.functions.values()]:
        for node in onnx_ir.traversal.RecursiveGraphIterator(graph):
            for key in SOURCE_LOCATION_KEYS:
                node.metadata_props.pop(key, None)


def _run(module: nn.Module, inputs: dict[str, Any]) -> np.ndarray:
    """The module's (first) output in float64 numpy; inputs go positionally where forward allows
    (a program loaded from .pt2 accepts only the positional form it was exported with)."""
    args, kwargs, _, _ = positional(module, inputs, {k: None for k in inputs})
    with torch.no_grad():
        out = module(*args, **kwargs)
    out = first_tensor(out)
    return out.detach().cpu().to(torch.float64).numpy()


def _to64(v: Any) -> Any:
    return v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def output_diff(got: np.ndarray, ref: np.ndarray, what: str) -> float:
    """Max |got - ref|, where NaN never counts as equal: a non-finite reference is refused (nothing can
    be verified against it) and a non-finite output where the reference is finite is an infinite diff."""
    if not ref.size:
        return 0.0
    if not np.isfinite(ref).all():
        raise SlimcError(f"the model's own outputs are not finite (NaN or Inf) on the probe input, so {what} cannot be verified "
                         "against them; nothing was written (the load warning names the weights that hold NaN/Inf)")
    diff = np.abs(got - ref)
    return float(diff.max()) if np.isfinite(diff).all() else float("inf")


def float64_errors(module: nn.Module, samples: list[dict[str, Any]], outputs: list[np.ndarray]) -> tuple[float, float]:
    """(max |outputs - exact|, max |PyTorch fp32 - exact|), "exact" being the module run in float64.

    Deep models with outlier activations (SmolLM2 after pruning) have fp32 rounding noise above
    1e-3 in their logits in PyTorch itself; this tells such noise apart from an export error.
    The module is converted in place and back (fp32 -> fp64 -> fp32 is lossless).
    """
    dtype = next(iter(module.parameters())).dtype
    ref32 = [_run(module, x) for x in samples]
    module.to(torch.float64)
    try:
        exact = [_run(module, {k: _to64(v) for k, v in x.items()}) for x in samples]
    finally:
        module.to(dtype)
    runtime = max(float(np.abs(o - e).max()) for o, e in zip(outputs, exact))
    torch32 = max(float(np.abs(r - e).max()) for r, e in zip(ref32, exact))
    return runtime, torch32


def reload_written(path: Path) -> tuple[Any, dict[str, Any]]:
    """Re-load a written file as an input would be loaded, so its external data must be relative,
    inside its directory and long enough (`frontends.import_onnx.load_onnx`'s checks); returns the
    model and where its weights are (inline or the data files) for the report."""
    import onnx_ir

    from slimc.compiler.frontends.import_onnx import load_onnx

    written = load_onnx(path, normalize=False)
    files = sorted({str(v.const_value.location) for g in written.graphs() for v in g.initializers.values()
                    if isinstance(v.const_value, onnx_ir.ExternalTensor)})
    return written, {"weights": "external" if files else "inline", "data_files": files}


def verify_weights(expected: Any, path: Path) -> dict[str, Any]:
    """Re-load the written file (`reload_written`) and compare every initializer, byte for byte, with
    `expected`, the in-memory model that was written."""
    written, where = reload_written(path)
    got = {v.name: v.const_value for g in written.graphs() for v in g.initializers.values()}
    want = {v.name: v.const_value for g in expected.graphs() for v in g.initializers.values()}
    if sorted(got) != sorted(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise SlimcError(f"the written ONNX model's initializers differ from the model's (missing {missing[:3]}, extra "
                         f"{extra[:3]}); nothing was written")
    for name, tensor in want.items():
        mine = got[name]
        if tensor is None or mine is None:
            if tensor is not mine:
                raise SlimcError(f"the written ONNX model's initializer '{name}' lost or gained its value; nothing was written")
            continue
        a, b = tensor.numpy(), mine.numpy()
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            raise SlimcError(f"the written ONNX model's initializer '{name}' differs from the model's; nothing was written")
    return {**where, "initializers": len(want)}


def verify_onnx(model: Model, path: Path, atol: float | None = None) -> dict[str, Any]:
    """Run ONNX Runtime on sample inputs and compare with PyTorch; fail beyond tolerance.

    When the plain difference exceeds `atol`, both runtimes are compared with a float64 PyTorch run:
    ONNX Runtime passes if it is no further from exact maths than max(atol, 4 x PyTorch fp32's own
    error, 1e-4 x the largest output magnitude). Two fp32 implementations with different reduction
    orders (MLAS tiles vs. PyTorch's BLAS, varying with the thread count) each carry rounding noise
    of that order through 30 decoder layers; an export error (a wrong op, a stale weight) is orders
    of magnitude larger. All numbers go into the report.
    """
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 — ORT raises its own exception types
        raise SlimcError(f"ONNX Runtime cannot open the exported model: {str(e).strip().splitlines()[0]}") from e
    if model.is_onnx:
        return {"check": "ort session opens, weights re-read equal", "ok": True, "runtime": f"onnxruntime {ort.__version__}",
                **verify_weights(model.onnx, path)}
    module, example, _, more = export_spec(model)
    samples = [example, *more]
    names = [i.name for i in session.get_inputs()]
    worst_abs, worst_rel, scale, outputs = 0.0, 0.0, 0.0, []
    for inputs in samples:
        got = session.run(None, {n: inputs[n].cpu().numpy() for n in names})[0].astype(np.float64)
        ref = _run(module, inputs)
        if got.shape != ref.shape:
            raise SlimcError(f"ONNX output shape {got.shape} differs from PyTorch {ref.shape}")
        outputs.append(got)
        diff = output_diff(got, ref, "the ONNX model")
        scale = max(scale, float(np.abs(ref).max()) if ref.size else 0.0)
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale > 0 else 0.0)
    limit = atol if atol is not None else (LLM_ATOL if model.is_causal_lm else 1e-3 * max(1.0, scale))
    result = {
        "check": "onnxruntime vs pytorch",
        "runtime": f"onnxruntime {ort.__version__}",
        "opset": OPSET,
        "input_shapes": [[list(v.shape) for v in x.values() if isinstance(v, torch.Tensor)] for x in samples],
        "max_abs_diff": worst_abs,
        "max_rel_diff": worst_rel,
        "atol": limit,
        "ok": worst_abs <= limit,
        **reload_written(path)[1],
    }
    if not result["ok"]:
        ort_err, torch_err = float64_errors(module, samples, outputs)
        bound = max(limit, FP32_NOISE_FACTOR * torch_err, FP32_NOISE_REL * scale)
        result["float64_check"] = {"onnxruntime_vs_fp64": ort_err, "pytorch_fp32_vs_fp64": torch_err,
                                   "max_abs_output": scale, "bound": bound}
        result["ok"] = ort_err <= bound
    if not result["ok"]:
        raise SlimcError(
            f"ONNX Runtime output differs from PyTorch by {worst_abs:.3g} (> {limit:g}) and from a float64 run by "
            f"{result['float64_check']['onnxruntime_vs_fp64']:.3g} (PyTorch fp32: "
            f"{result['float64_check']['pytorch_fp32_vs_fp64']:.3g}); nothing was written"
        )
    return result
