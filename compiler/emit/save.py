"""`save`: write a model in one or more formats, verify each, write the report, all atomically.

    report = save(model, "out/", format="hf")      # hf | onnx | pt2 | all

Everything goes into a temporary directory beside OUT; each emitter's output is checked (the HF
checkpoint is re-loaded and its logits compared, ONNX runs in ONNX Runtime, the .pt2 is re-loaded)
and only then is the directory moved to OUT. On any failure nothing is left at OUT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from slimc.compiler.emit.atomic import atomic_dir
from slimc.compiler.emit.hf import verify_hf, write_hf
from slimc.compiler.emit.onnx_export import verify_onnx, write_onnx
from slimc.compiler.emit.pt2_export import verify_pt2, write_pt2
from slimc.compiler.emit.report import build_report, write_report
from slimc.compiler.model import Model
from slimc.errors import SlimcError

FORMATS = ("hf", "onnx", "pt2")


def formats_for(format: str) -> list[str]:
    if format == "all":
        return list(FORMATS)
    names = [f.strip() for f in format.split(",") if f.strip()]
    bad = [f for f in names if f not in FORMATS]
    if bad or not names:
        raise SlimcError(f"unknown output format '{format}'; choose hf, onnx, pt2 or all")
    return names


def check_dtype(formats: list[str], dtype: torch.dtype | None) -> None:
    """Refuse a format that cannot be written and verified in `dtype`: ONNX Runtime's CPU provider
    has no bfloat16 kernels, so a bfloat16 ONNX graph could not be checked against PyTorch."""
    if "onnx" in formats and dtype == torch.bfloat16:
        raise SlimcError(
            "ONNX output in bfloat16 cannot be verified (ONNX Runtime's CPU provider has no bfloat16 kernels); "
            "use --dtype float16 or float32 for --format onnx (hf and pt2 take bfloat16)"
        )


def check_writable(model: Model, formats: list[str]) -> None:
    """Refuse, before any pass runs, output formats this model cannot be written in."""
    if "hf" in formats and (model.module is None or model.config is None or not hasattr(model.module, "save_pretrained")):
        kind = "an ONNX graph" if model.is_onnx else f"a {type(model.module).__name__} without a Hugging Face config"
        raise SlimcError(f"the hf format needs a Hugging Face model and this one is {kind}; use --format onnx or pt2")
    if "pt2" in formats and model.module is None:
        raise SlimcError("an ONNX model cannot be written as .pt2; use --format onnx")
    if not model.is_causal_lm and not model.is_onnx and not model.example_inputs and ({"onnx", "pt2"} & set(formats)):
        raise SlimcError("export needs example inputs for a model that is not a causal LM; use a .pt2 input, give --data "
                         "(its first example is used), or set Model.example_inputs in the Python API")


def save(
    model: Model,
    out: str | Path,
    *,
    format: str = "hf",
    protect: Iterable[Path] = (),
    input_info: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    before_layers: list[dict[str, int]] | None = None,
    step: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Write, verify and report; returns the report dict (also in OUT/report.json).

    `step(label)` may return a context manager (the CLI's progress display) wrapped round each stage.
    """
    import contextlib

    formats = formats_for(format)
    if model.module is not None:
        check_dtype(formats, next(iter(model.module.parameters()), torch.empty(0)).dtype)
    stage = step or (lambda label: contextlib.nullcontext())
    protect = [*protect, *([model.source] if model.source else [])]
    if model.module is not None:
        model.module.to("cpu").eval()  # emit and verify on CPU: exporters and ORT run there
    verification: dict[str, Any] = {}
    written: dict[str, Any] = {}
    with atomic_dir(out, protect=protect) as tmp:
        if "hf" in formats:
            with stage("Writing HF checkpoint"):
                written["hf"] = write_hf(model, tmp)
            with stage("Re-loading HF checkpoint and comparing logits"):
                verification["hf"] = verify_hf(model, tmp)
        if "hf" not in formats and model.tokenizer is not None:
            # beside model.onnx / model.pt2, so `compress eval OUT` and `slimc.load(OUT)` find it
            model.tokenizer.save_pretrained(str(tmp))
        if "onnx" in formats:
            with stage("Exporting ONNX"):
                written["onnx"] = str(write_onnx(model, tmp).name)
            with stage("Running ONNX Runtime parity check"):
                verification["onnx"] = verify_onnx(model, tmp / written["onnx"])
        if "pt2" in formats:
            with stage("Exporting .pt2 (torch.export)"):
                written["pt2"] = str(write_pt2(model, tmp).name)
            with stage("Re-loading .pt2 and comparing"):
                verification["pt2"] = verify_pt2(model, tmp / written["pt2"])
        report = build_report(
            model, tmp, formats=formats, verification=verification, written=written,
            input_info=input_info, recipe=recipe,
        )
        report["output"]["path"] = str(Path(out).expanduser().resolve())
        write_report(report, tmp, before_layers)
    return report
